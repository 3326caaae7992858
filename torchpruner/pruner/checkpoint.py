"""Pruned checkpoints: a state dict plus a small JSON manifest that resizes a fresh model.

A pruned model's state dict cannot be loaded into a freshly built model of the same architecture:
the shapes differ. The manifest records, per layer, the original unit ids it still holds (the
Pruner's kept-units record), every Dropout's ``p`` and every convolution's ``groups``, and the
shape of every tensor. :func:`load_pruned` replays the removals on the fresh model with the same
slicing rules the Pruner uses, checks every shape against the manifest, and only then loads the
tensors (``torch.load(..., weights_only=True)``).

    save_pruned(model, "pruned.pt")          # writes pruned.pt and pruned.pt.manifest.json
    fresh = build_model()
    load_pruned(fresh, "pruned.pt")          # resized in place, weights loaded
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from torchpruner._state import unwrap_model
from torchpruner.rules import KEPT_UNITS_ATTRIBUTE, get_slicing_rule, kept_units

from .pruner import Pruner

__all__ = ["pruning_manifest", "resize_to_manifest", "save_pruned", "load_pruned", "MANIFEST_SUFFIX"]

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
PathLike = Union[str, os.PathLike]


def pruning_manifest(model: nn.Module) -> Dict[str, Any]:
    """What a fresh model needs to take this model's shapes (JSON-serialisable)."""
    model = unwrap_model(model)
    layers: Dict[str, Dict[str, List[int]]] = {}
    dropout: Dict[str, float] = {}
    groups: Dict[str, int] = {}
    for name, module in model.named_modules():
        record = getattr(module, KEPT_UNITS_ATTRIBUTE, None)
        if record:
            layers[name] = {direction: [int(i) for i in ids] for direction, ids in record.items()}
        if isinstance(module, nn.modules.dropout._DropoutNd):
            dropout[name] = float(module.p)
        if isinstance(module, nn.modules.conv._ConvNd):
            groups[name] = int(module.groups)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    return {"version": MANIFEST_VERSION, "kept_units": layers, "dropout_p": dropout, "conv_groups": groups,
            "shapes": shapes}


def _resize(model: nn.Module, manifest: Dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    pruner = Pruner(model, example_inputs=torch.zeros(1))  # prune_module needs no trace
    for name, record in manifest.get("kept_units", {}).items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the manifest names a layer '{name}' that this model does not have")
        _resize_bare_parameters(pruner, module, name, record)
        if not any(direction in record for direction in ("in", "out")):
            continue
        if get_slicing_rule(module) is None:
            raise ValueError(f"'{name}' ({type(module).__name__}) has no slicing rule, cannot take the saved shape")
        # "in" first: for depthwise/pass-through layers it removes the matching outputs as well
        for direction in ("in", "out"):
            if direction not in record:
                continue
            current = kept_units(module, direction)
            if current is None:
                raise ValueError(f"'{name}' has no {direction}put units, but the manifest records some")
            remove = _positions_to_remove(current, record[direction], f"'{name}'", f"{direction}put units")
            if remove:
                pruner.prune_module(module, remove, direction=direction,
                                    original_len=len(current) if isinstance(module, nn.modules.dropout._DropoutNd) else None)
    for name, p in manifest.get("dropout_p", {}).items():
        module = modules.get(name)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = float(p)
    mismatched = []
    for name, value in manifest.get("conv_groups", {}).items():
        module = modules.get(name)
        if module is not None and getattr(module, "groups", value) != value:
            mismatched.append(f"{name}.groups: {module.groups} != {value}")
    state = model.state_dict()
    for key, shape in manifest.get("shapes", {}).items():
        if key not in state:
            mismatched.append(f"{key}: missing")
        elif list(state[key].shape) != list(shape):
            mismatched.append(f"{key}: {list(state[key].shape)} != saved {list(shape)}")
    if mismatched:
        raise ValueError("the model cannot take the saved shapes (tensors pruned outside a recorded layer, or "
                         "another architecture): " + "; ".join(mismatched[:8]))


def _positions_to_remove(current: List[int], wanted_ids: List[int], label: str, what: str) -> List[int]:
    """Positions of ``current`` (original ids held now) whose ids the manifest does not keep."""
    wanted = set(wanted_ids)
    missing = wanted - set(current)
    if missing:
        raise ValueError(f"{label}: the manifest keeps {what} {sorted(missing)[:5]} that this model does not have "
                         f"(different architecture?)")
    return [position for position, unit in enumerate(current) if unit not in wanted]


def _resize_bare_parameters(pruner: Pruner, module: nn.Module, name: str, record: Dict[str, List[int]]) -> None:
    """Replay the slices of bare parameters (position embeddings, class tokens, layer scales) that
    a coupled group removed: recorded as ``"param:<parameter>:<axis>"`` -> kept ids."""
    for key, wanted_ids in record.items():
        if not key.startswith("param:"):
            continue
        _, parameter, axis_text = key.split(":")
        axis = int(axis_text)
        tensor = getattr(module, parameter, None)
        if not isinstance(tensor, torch.Tensor) or not -tensor.dim() <= axis < tensor.dim():
            raise ValueError(f"the manifest slices '{name}.{parameter}' on axis {axis}, which this model does not have")
        own = getattr(module, KEPT_UNITS_ATTRIBUTE, None) or {}
        current = own.get(key, list(range(tensor.shape[axis])))
        remove = _positions_to_remove(current, wanted_ids, f"'{name}.{parameter}'", "entries")
        wanted = set(wanted_ids)
        if remove:
            pruner.prune_parameter(module, parameter, remove, axis=axis)
            setattr(module, KEPT_UNITS_ATTRIBUTE, {**own, key: [unit for unit in current if unit in wanted]})


def resize_to_manifest(model: nn.Module, manifest: Dict[str, Any]) -> nn.Module:
    """Prune a freshly built ``model`` in place so its shapes match ``manifest``.

    The removals are replayed on a copy first; if any layer or shape disagrees, a ValueError names
    it and ``model`` is left unchanged.
    """
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {manifest.get('version')!r}")
    model = unwrap_model(model)
    _resize(copy.deepcopy(model), manifest)  # validate without touching the user's model
    _resize(model, manifest)
    return model


def save_pruned(model: nn.Module, path: PathLike) -> Path:
    """Save ``model``'s state dict to ``path`` and its manifest to ``path + ".manifest.json"``."""
    model = unwrap_model(model)
    path = Path(path)
    torch.save(model.state_dict(), path)
    manifest_path = Path(str(path) + MANIFEST_SUFFIX)
    manifest_path.write_text(json.dumps(pruning_manifest(model), indent=1), encoding="utf-8")
    return manifest_path


def load_pruned(model: nn.Module, path: PathLike, map_location: Optional[Any] = None) -> nn.Module:
    """Resize a freshly built ``model`` with the manifest next to ``path``, then load the weights.

    The weights are read with ``torch.load(..., weights_only=True)``.
    """
    path = Path(path)
    manifest_path = Path(str(path) + MANIFEST_SUFFIX)
    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest next to {path} (expected {manifest_path})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = resize_to_manifest(model, manifest)
    model.load_state_dict(state)
    return model
