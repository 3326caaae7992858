"""Prune a tiny Llama (grouped-query attention, 2 KV heads) by group Taylor scores, then keep
training it with the AdamW that existed before the prune.

The Pruner traces it with torch.fx and the example inputs at hand (its shape-dependent Python is
decided on the example; torch.export, non-strict, is the fallback and gives the same groups). Its
groups are the hidden size (the embedding, every projection's inputs, o_proj and down_proj outputs, every RMSNorm weight), the attention heads of each layer (a KV head together
with its two query heads: q_proj rows, k_proj/v_proj rows, o_proj columns) and each MLP
(gate_proj + up_proj + down_proj). They are scored on a few batches of token ids and half of
every group is removed. The hidden size is scored by zeroing its units, which is not exactly
pruning them (the RMSNorm statistics change): the library says so with a warning. At the end
``update_config`` writes the pruned widths into the model's config, so that ``save_pretrained``
and ``from_pretrained`` round-trip the smaller model.

    python examples/prune_tiny_llama.py
"""

import tempfile
import warnings

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

from torchpruner import Pruner, TaylorAttributionMetric, prune_groups
from torchpruner.graph.dependency import RefusedGroupsWarning
from torchpruner.integrations.transformers import update_config

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    use_cache=False,
)
llama = LlamaForCausalLM(config)
adamw = torch.optim.AdamW(llama.parameters(), lr=3e-3)
tokens = torch.randint(0, 128, (32, 17))
batches = [(t[:, :-1], t[:, 1:]) for t in tokens.split(8)]  # (input ids, next tokens)


def next_token_loss(output, targets, reduction="mean"):
    """Cross-entropy of the next token, one loss per sequence when reduction="none"."""
    losses = F.cross_entropy(output.logits.transpose(1, 2), targets, reduction="none").mean(1)
    return losses if reduction == "none" else losses.mean()


before = sum(p.numel() for p in llama.parameters())
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RefusedGroupsWarning)  # listed below instead
    pruner = Pruner(llama, optimizer=adamw, example_inputs={"input_ids": batches[0][0]})
    groups = pruner.groups()
print(f"captured by {pruner.graph().capture}: {len(groups)} prunable groups, {len(pruner.refused_groups())} refused")
heads = next(g for g in groups if llama.model.layers[0].self_attn.k_proj in g.source_modules)
print(heads)
taylor = TaylorAttributionMetric(llama, batches, next_token_loss, "cpu")
prune_groups(pruner, fraction=0.5, scores=taylor.run)  # half of every group, by group Taylor
after = sum(p.numel() for p in llama.parameters())
layers = llama.model.layers
print(
    f"parameters {before:,} -> {after:,}; hidden size {config.hidden_size} -> {llama.model.norm.weight.numel()};",
    "KV heads",
    [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in layers],
    "query heads",
    [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in layers],
    "mlp widths",
    [layer.mlp.up_proj.out_features for layer in layers],
)

start = {name: p.detach().clone() for name, p in llama.named_parameters()}
losses = []
for step in range(8):  # the same AdamW keeps training the smaller model
    inputs, targets = batches[step % len(batches)]
    adamw.zero_grad()
    loss = next_token_loss(llama(input_ids=inputs), targets)
    loss.backward()
    adamw.step()
    losses.append(round(loss.item(), 3))
print("training loss", losses)
stale = [name for name, p in llama.named_parameters() if torch.equal(start[name], p)]
print("every parameter updated" if not stale else f"not updated: {stale}")
assert losses[-1] < losses[0] and not stale

transformers_logging.disable_progress_bar()
update_config(llama)  # the config (and the attention attributes) now hold the pruned widths
with tempfile.TemporaryDirectory() as folder:
    llama.save_pretrained(folder)
    loaded = LlamaForCausalLM.from_pretrained(folder)
llama.eval(), loaded.eval()
with torch.no_grad():
    same = torch.equal(llama(input_ids=batches[0][0]).logits, loaded(input_ids=batches[0][0]).logits)
c = loaded.config
print(
    f"save_pretrained -> from_pretrained: hidden {c.hidden_size}, heads {c.num_attention_heads}, "
    f"KV heads {c.num_key_value_heads}, MLP {c.intermediate_size}; same logits: {same}"
)
assert same
