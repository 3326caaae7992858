"""``update_config``: after a prune, a Hugging Face model's config and attention attributes
describe the pruned widths, so that ``save_pretrained`` / ``from_pretrained`` round-trip it.

The oracle is the round trip itself: the model loaded from the saved directory (built from the
updated config) gives the pruned model's outputs exactly. Where the config cannot describe the
pruned widths (BERT-style configs tie the head size to ``hidden_size // num_attention_heads``;
layers pruned differently), ``update_config`` refuses with a ValueError and changes nothing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from test_capture_hf_heads import tiny_decoder

from torchpruner.pruner import Pruner
from torchpruner.schedule import prune_groups

tf = pytest.importorskip("transformers")
from torchpruner.integrations.transformers import update_attention_attributes, update_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def llama():
    model, input_ids = tiny_decoder("llama")  # hidden 64, 4 query heads, 2 KV heads, float64
    return model, {"input_ids": input_ids}


def t5():
    torch.manual_seed(0)
    config = tf.T5Config(num_layers=2, num_heads=4, d_model=32, d_kv=8, d_ff=64, vocab_size=97)
    return tf.T5EncoderModel(config).eval(), {"input_ids": torch.randint(1, 97, (2, 8))}


def bert():
    torch.manual_seed(0)
    config = tf.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=96, vocab_size=97
    )
    return tf.BertModel(config).eval(), {"input_ids": torch.randint(1, 97, (2, 8))}


def pruned(build, **options):
    model, inputs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_groups(Pruner(model, example_inputs=inputs), **options)
    return model, inputs


def output(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model).from_pretrained(tmp_path).eval()


@pytest.mark.parametrize(
    "build, options, expected",
    [
        # a KV head with its two query heads, half the hidden size, half the MLP
        (llama, {"fraction": 0.5}, {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}),
        # one head in every layer and the MLP (the hidden size of T5 is tied to its embedding: refused)
        (t5, {"fraction": 0.3}, {"num_attention_heads": 3, "num_heads": 3, "d_ff": 45}),
    ],
    ids=["llama", "t5"],
)
def test_the_updated_config_round_trips_the_pruned_model(build, options, expected, tmp_path):
    model, inputs = pruned(build, **options)
    before = output(model, inputs)
    changes = update_config(model)
    for field, value in expected.items():
        assert getattr(model.config, field) == value, field
    assert changes and all(old != new for old, new in changes.values())
    torch.testing.assert_close(output(model, inputs), before, rtol=0, atol=0)  # attributes only
    loaded = round_trip(model, tmp_path)
    torch.testing.assert_close(output(loaded, inputs), before, rtol=0, atol=0)
    assert update_config(model) == {}  # nothing left to change


def test_attention_attributes_follow_the_heads():
    model, _ = pruned(t5, fraction=0.3)
    update_config(model)
    for block in model.encoder.block:
        attention = block.layer[0].SelfAttention
        assert attention.n_heads == attention.q.out_features // attention.key_value_proj_dim == 3
        assert attention.inner_dim == 3 * attention.key_value_proj_dim


def test_a_config_that_cannot_hold_the_widths_is_refused_and_nothing_changes():
    """BERT ties the head size to hidden_size // num_attention_heads: 3 heads of 16 over a pruned
    hidden size cannot be written as a BertConfig."""
    model, _ = pruned(bert, fraction=0.3)
    config = copy.deepcopy(model.config.to_dict())
    attributes = {n: dict(vars(m)) for n, m in model.named_modules() if hasattr(m, "all_head_size")}
    with pytest.raises(ValueError, match="save_pruned"):
        update_config(model)
    assert model.config.to_dict() == config
    for name, module in model.named_modules():
        if name in attributes:
            assert module.all_head_size == attributes[name]["all_head_size"]


def test_layers_pruned_differently_are_refused():
    model, inputs = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example_inputs=inputs)
        first = model.model.layers[0].self_attn.k_proj
        prune_groups(pruner, fraction=0.0, ratios={first: 0.5})
    hidden = model.config.hidden_size
    with pytest.raises(ValueError, match="different"):
        update_config(model)
    assert model.config.hidden_size == hidden and model.config.num_key_value_heads == 2


def test_an_invalid_config_is_refused_with_the_reason():
    """Llama's hidden size must be a multiple of the head count: 45 is not."""
    model, _ = pruned(llama, fraction=0.3)
    with pytest.raises(ValueError, match="round_to|cannot be built"):
        update_config(model)
    assert model.config.hidden_size == 64


def test_a_model_without_a_config_is_a_type_error():
    with pytest.raises(TypeError, match="config"):
        update_config(torch.nn.Linear(2, 2))


def test_the_attributes_alone_when_the_config_cannot_follow():
    """BERT: the config refuses, the attention attributes still follow the heads, and the pruned
    model computes the same."""
    model, inputs = pruned(bert, fraction=0.3)
    before = output(model, inputs)
    changes = update_attention_attributes(model)
    for layer in model.encoder.layer:
        attention = layer.attention.self
        heads = attention.query.out_features // attention.attention_head_size
        assert heads == 3 and attention.num_attention_heads == 3 and attention.all_head_size == 48
    assert changes and update_attention_attributes(model) == {}
    torch.testing.assert_close(output(model, inputs), before, rtol=0, atol=0)
