"""Pruned checkpoints: a state dict plus a small JSON manifest that resizes a fresh model.

A pruned model's state dict cannot be loaded into a freshly built model of the same architecture:
the shapes differ. The manifest records, per layer, the original unit ids it still holds (the
Pruner's kept-units record), every Dropout's ``p`` and every convolution's ``groups``, and the
shape of every tensor. :func:`load_pruned` replays the removals on the fresh model with the same
slicing rules the Pruner uses and loads the tensors (``torch.load(..., weights_only=True)``).

Everything is checked before the fresh model changes: the manifest's format (a JSON object, record
keys ``"in"``, ``"out"`` or ``"param:<parameter>:<axis>"``, distinct integer unit ids, Dropout
``p`` in [0, 1]), then the removals are replayed on a copy of the model, whose shapes must match
the manifest's and whose state-dict keys and shapes must match the checkpoint's. Only then is the
model itself resized and loaded; a refused load leaves it exactly as it was.

    save_pruned(model, "pruned.pt")          # writes pruned.pt and pruned.pt.manifest.json
    fresh = build_model()
    load_pruned(fresh, "pruned.pt")          # resized in place, weights loaded
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchpruner._state import unwrap_model
from torchpruner.rules import KEPT_UNITS_ATTRIBUTE, SHAPE_ATTRIBUTES_ATTRIBUTE, get_slicing_rule, kept_units

from .pruner import Pruner

__all__ = ["pruning_manifest", "resize_to_manifest", "save_pruned", "load_pruned", "MANIFEST_SUFFIX"]

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
# the key of a bare parameter's kept ids in a layer's record (torchpruner.rules.param_record_key)
_PARAM_KEY = re.compile(r"param:([A-Za-z_][A-Za-z0-9_]*):(-?[0-9]+)")


def pruning_manifest(model: nn.Module) -> dict[str, Any]:
    """What a fresh model needs to take this model's shapes (JSON-serialisable)."""
    model = unwrap_model(model)
    layers: dict[str, dict[str, list[int]]] = {}
    dropout: dict[str, float] = {}
    groups: dict[str, int] = {}
    size_attributes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        record = getattr(module, KEPT_UNITS_ATTRIBUTE, None)
        if record:
            layers[name] = {direction: [int(i) for i in ids] for direction, ids in record.items()}
        if isinstance(module, nn.modules.dropout._DropoutNd):
            dropout[name] = float(module.p)
        if isinstance(module, nn.modules.conv._ConvNd):
            groups[name] = int(module.groups)
        sizes = getattr(module, SHAPE_ATTRIBUTES_ATTRIBUTE, None)
        if sizes:
            size_attributes[name] = dict(sizes)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "kept_units": layers,
        "dropout_p": dropout,
        "conv_groups": groups,
        "shapes": shapes,
    }
    if size_attributes:
        manifest["size_attributes"] = size_attributes
    return manifest


# --------------------------------------------------------------------------------------------
# The manifest's format, checked before any model is touched
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_param_key(key: str) -> tuple[str, int] | None:
    """``"param:<parameter>:<axis>"`` -> (parameter, axis); None for any other key."""
    match = _PARAM_KEY.fullmatch(key)
    return None if match is None else (match.group(1), int(match.group(2)))


def _section(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    section = manifest.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"the manifest's '{name}' must be a JSON object, got {type(section).__name__}")
    return section


def _check_manifest(manifest: Any) -> None:
    """Refuse a manifest whose format is wrong (names the entry); looks at no model."""
    if not isinstance(manifest, dict):
        raise TypeError(
            f"the manifest must be a JSON object (as written by save_pruned / pruning_manifest), "
            f"got {type(manifest).__name__}"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {manifest.get('version')!r}")
    for name, record in _section(manifest, "kept_units").items():
        if not isinstance(record, dict):
            raise ValueError(
                f"the manifest's record of '{name}' must map 'in' / 'out' / 'param:<parameter>:<axis>' "
                f"to unit ids, got {type(record).__name__}"
            )
        for key, ids in record.items():
            if key not in ("in", "out") and _parse_param_key(key) is None:
                raise ValueError(
                    f"the manifest's record of '{name}' has a key '{key}' that is neither 'in', 'out' "
                    f"nor 'param:<parameter>:<axis>'"
                )
            if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(
                    f"the manifest keeps {ids!r} as '{name}' {key} ids; expected a list of non-negative integers"
                )
            if len(set(ids)) != len(ids):
                raise ValueError(f"the manifest keeps '{name}' {key} ids with repeats: {ids[:10]}")
    for name, p in _section(manifest, "dropout_p").items():
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:  # NaN fails too
            raise ValueError(f"the manifest sets '{name}'.p to {p!r}; a Dropout p must be a number in [0, 1]")
    for name, groups in _section(manifest, "conv_groups").items():
        if not _is_int(groups) or groups < 1:
            raise ValueError(f"the manifest sets '{name}'.groups to {groups!r}; expected a positive integer")
    for name, sizes in _section(manifest, "size_attributes").items():
        if not isinstance(sizes, dict) or not all(
            isinstance(attribute, str)
            and attribute.isidentifier()
            and not attribute.startswith("_")
            and (_is_int(size) and size >= 0 or isinstance(size, list) and all(_is_int(n) and n >= 0 for n in size))
            for attribute, size in sizes.items()
        ):
            raise ValueError(
                f"the manifest's size attributes of '{name}' must map public attribute names to a "
                f"non-negative integer or a list of them, got {sizes!r}"
            )
    for key, shape in _section(manifest, "shapes").items():
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ValueError(
                f"the manifest records the shape of '{key}' as {shape!r}; expected a list of non-negative integers"
            )


# --------------------------------------------------------------------------------------------
# Replaying the removals
# --------------------------------------------------------------------------------------------


def _resize(model: nn.Module, manifest: dict[str, Any]) -> None:
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
                pruner.prune_module(
                    module,
                    remove,
                    direction=direction,
                    original_len=len(current) if isinstance(module, nn.modules.dropout._DropoutNd) else None,
                )
    for name, p in manifest.get("dropout_p", {}).items():
        module = modules.get(name)
        if not isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(
                f"the manifest sets the Dropout p of '{name}', which is not a Dropout layer of this "
                f"model (another architecture?)"
            )
        module.p = float(p)
    for name, sizes in manifest.get("size_attributes", {}).items():
        _set_size_attributes(modules.get(name), name, sizes)
    mismatched = []
    for name, value in manifest.get("conv_groups", {}).items():
        module = modules.get(name)
        if module is None:
            mismatched.append(f"{name}: missing")
        elif getattr(module, "groups", value) != value:
            mismatched.append(f"{name}.groups: {module.groups} != {value}")
    state = model.state_dict()
    for key, shape in manifest.get("shapes", {}).items():
        if key not in state:
            mismatched.append(f"{key}: missing")
        elif list(state[key].shape) != list(shape):
            mismatched.append(f"{key}: {list(state[key].shape)} != saved {list(shape)}")
    if mismatched:
        raise ValueError(
            "the model cannot take the saved shapes (tensors pruned outside a recorded layer, or "
            "another architecture): " + "; ".join(mismatched[:8])
        )


def _set_size_attributes(module: nn.Module | None, name: str, sizes: dict[str, Any]) -> None:
    """Set the sizes a plan changed outside any slicing rule (a functional LayerNorm's
    ``normalized_shape``), keeping each attribute's type (int, tuple, list, torch.Size)."""
    if module is None:
        raise ValueError(f"the manifest sets size attributes of '{name}', which this model does not have")
    for attribute, size in sizes.items():
        current = getattr(module, attribute, None)
        if isinstance(size, int) and _is_int(current):
            value: Any = size
        elif isinstance(size, list) and isinstance(current, (tuple, list, torch.Size)) and len(current) == len(size):
            value = torch.Size(size) if isinstance(current, torch.Size) else type(current)(size)
        else:
            raise ValueError(
                f"the manifest sets '{name}'.{attribute} to {size!r}, but this model's '{name}' holds "
                f"{current!r} there (another architecture?)"
            )
        setattr(module, attribute, value)
    setattr(module, SHAPE_ATTRIBUTES_ATTRIBUTE, dict(sizes))


def _positions_to_remove(current: list[int], wanted_ids: list[int], label: str, what: str) -> list[int]:
    """Positions of ``current`` (original ids held now) whose ids the manifest does not keep."""
    wanted = set(wanted_ids)
    missing = wanted - set(current)
    if missing:
        raise ValueError(
            f"{label}: the manifest keeps {what} {sorted(missing)[:5]} that this model does not have "
            f"(different architecture?)"
        )
    return [position for position, unit in enumerate(current) if unit not in wanted]


def _resize_bare_parameters(pruner: Pruner, module: nn.Module, name: str, record: dict[str, list[int]]) -> None:
    """Replay the slices of bare parameters (position embeddings, class tokens, layer scales) that
    a coupled group removed: recorded as ``"param:<parameter>:<axis>"`` -> kept ids."""
    for key, wanted_ids in record.items():
        parsed = _parse_param_key(key)
        if parsed is None:
            continue
        parameter, axis = parsed
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


def _resized_copy(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` resized to ``manifest`` (raises, naming the problem, if it cannot be)."""
    trial = copy.deepcopy(model)
    _resize(trial, manifest)
    return trial


def _check_state_fits(resized: nn.Module, state: Any, path: Path) -> None:
    """``state`` has exactly the keys and tensor shapes of the ``resized`` model's state dict."""
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise TypeError(
            f"{path} does not hold a state dict (a mapping of names to tensors), got "
            f"{type(state).__name__}; save it with save_pruned"
        )
    expected = resized.state_dict()
    problems = [f"unexpected key '{key}'" for key in state if key not in expected]
    problems += [f"missing key '{key}'" for key in expected if key not in state]
    for key, tensor in state.items():
        target = expected.get(key)
        if isinstance(tensor, torch.Tensor) and isinstance(target, torch.Tensor) and tensor.shape != target.shape:
            problems.append(
                f"{key}: the checkpoint holds {list(tensor.shape)}, the model resized by the manifest "
                f"takes {list(target.shape)}"
            )
    if problems:
        raise ValueError(
            f"the checkpoint {path} does not fit the model its manifest describes (weights and manifest "
            f"from different saves, or an edited file): " + "; ".join(problems[:8])
        )


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def resize_to_manifest(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Prune a freshly built ``model`` in place so its shapes match ``manifest``.

    The manifest's format is checked and the removals are replayed on a copy first; if anything
    disagrees, a TypeError/ValueError names it and ``model`` is left unchanged.
    """
    _check_manifest(manifest)
    model = unwrap_model(model)
    _resized_copy(model, manifest)  # validate without touching the user's model
    _resize(model, manifest)
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save ``model``'s state dict to ``path`` and its manifest to ``path + ".manifest.json"``;
    returns the manifest's path (which :func:`load_pruned` also accepts)."""
    model = unwrap_model(model)
    path = Path(path)
    torch.save(model.state_dict(), path)
    manifest_path = Path(str(path) + MANIFEST_SUFFIX)
    manifest_path.write_text(json.dumps(pruning_manifest(model), indent=1), encoding="utf-8")
    return manifest_path


def _read_manifest(manifest_path: Path) -> Any:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{manifest_path} is not valid JSON ({error}); it should be the manifest save_pruned wrote"
        ) from None


def load_pruned(model: nn.Module, path: str | os.PathLike[str], map_location: Any | None = None) -> nn.Module:
    """Resize a freshly built ``model`` with the manifest next to ``path``, then load the weights.

    ``path`` is the checkpoint given to :func:`save_pruned`, or the manifest path it returned.

    The weights are read with ``torch.load(..., weights_only=True)``. The manifest, and the
    checkpoint against the model the manifest describes (keys and shapes), are checked on a copy
    first: a refused load raises TypeError/ValueError naming the problem and leaves ``model``
    unchanged.
    """
    path = Path(path)
    if path.name.endswith(MANIFEST_SUFFIX):  # the path save_pruned returns: the weights sit next to it
        path = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
    manifest_path = Path(str(path) + MANIFEST_SUFFIX)
    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest next to {path} (expected {manifest_path})")
    manifest = _read_manifest(manifest_path)
    _check_manifest(manifest)
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = unwrap_model(model)
    trial = _resized_copy(model, manifest)
    _check_state_fits(trial, state, path)
    trial.load_state_dict(state)  # whatever else load_state_dict refuses, it refuses on the copy
    del trial
    _resize(model, manifest)
    model.load_state_dict(state)
    return model
