"""Slicing rule of ``nn.MultiheadAttention`` (embed-dim pruning), registered on import."""

from __future__ import annotations

import torch
import torch.nn as nn

from .edits import Edit, set_attribute, slice_tensor
from .registry import SlicingRule, UnitSelection, register_slicing_rule


@register_slicing_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(SlicingRule[nn.MultiheadAttention]):
    """Self-attention ``nn.MultiheadAttention`` (kdim == vdim == embed_dim): torch ties the q, k,
    v and output dims to ``embed_dim``, so embed dim ``i`` goes from the input (in_proj columns),
    from q, k and v (in_proj rows ``i``, ``E+i``, ``2E+i``) and from the output (out_proj rows and
    columns), the same local dims in every head (``head_dim`` shrinks, ``num_heads`` stays).
    Not equivalent to masking (the attention scale ``1/sqrt(head_dim)`` changes)."""

    passes_units_through = True
    input_unit_axis = -1
    tensors = frozenset(
        {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"}
    )

    def out_units(self, module: nn.MultiheadAttention) -> int:
        embed_dim: int = module.embed_dim  # an untyped constructor argument in torch
        return embed_dim

    in_units = out_units

    def prune_in(self, module: nn.MultiheadAttention, selection: UnitSelection) -> list[Edit]:
        if not module._qkv_same_embed_dim:
            raise ValueError("only MultiheadAttention with kdim == vdim == embed_dim can be pruned")
        embed, heads = module.embed_dim, module.num_heads
        head_dim = embed // heads
        local = sorted({int(i) % head_dim for i in selection.remove})
        if sorted(h * head_dim + j for h in range(heads) for j in local) != sorted(int(i) for i in selection.remove):
            raise ValueError(f"MultiheadAttention ({heads} heads of {head_dim}) must lose the same dims in every head")
        keep = selection.keep
        keep3 = torch.cat([keep, keep + embed, keep + 2 * embed])
        new = len(keep)
        # two slices of one tensor (rows, then columns): both planned against the original shape
        edits = slice_tensor(module, "in_proj_weight", 0, keep3) + slice_tensor(module, "in_proj_weight", 1, keep)
        edits += slice_tensor(module, "in_proj_bias", 0, keep3)
        for name in ("bias_k", "bias_v"):
            if getattr(module, name, None) is not None:
                edits += slice_tensor(module, name, 2, keep)
        edits += slice_tensor(module.out_proj, "weight", 0, keep) + slice_tensor(module.out_proj, "weight", 1, keep)
        edits += slice_tensor(module.out_proj, "bias", 0, keep)
        edits += set_attribute(module, "embed_dim", new) + set_attribute(module, "kdim", new)
        edits += set_attribute(module, "vdim", new) + set_attribute(module, "head_dim", new // heads)
        edits += set_attribute(module.out_proj, "in_features", new)
        edits += set_attribute(module.out_proj, "out_features", new)
        return edits

    prune_out = prune_in
