"""Prune a tiny Llama (grouped-query attention, 2 KV heads) by group Taylor scores, then keep
training it with the AdamW that existed before the prune.

torch.fx cannot trace Hugging Face models, so the Pruner captures this one with torch.export
(non-strict). Its MLP groups (gate_proj + up_proj + down_proj of each layer, together) are scored
on a few batches of token ids and half of every group is removed; the other groups are refused
with the op that stops them (``pruner.refused_groups()``).

    python examples/prune_tiny_llama.py
"""

import warnings

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from torchpruner import Pruner, TaylorAttributionMetric, prune_groups
from torchpruner.graph.dependency import RefusedGroupsWarning

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
print(groups[0])
taylor = TaylorAttributionMetric(llama, batches, next_token_loss, "cpu")
prune_groups(pruner, fraction=0.5, scores=taylor.run)  # half of every group, by group Taylor
after = sum(p.numel() for p in llama.parameters())
print(
    f"parameters {before:,} -> {after:,}; mlp widths", [layer.mlp.up_proj.out_features for layer in llama.model.layers]
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
