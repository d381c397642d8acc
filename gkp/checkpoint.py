"""Checkpoint files: state dicts plus plain data, never pickled modules.

Every file the pipeline saves (``checkpoint.pt``, ``final.pt``, ``pruned.pt``) is a dict of
tensors, numbers, strings, lists and dicts, written atomically (fsynced, then renamed) and read
with ``torch.load(weights_only=True)``, so a crafted file cannot run code and moving a class does
not break saved runs. A model is rebuilt from what the file says: the registered model's name
and the dataset's shape (``meta``), and, for a pruned network, its ``structure`` (the
``GroupPlan`` of every grouped-kernel layer as lists of ints).

A file from another model, dataset, run or format is refused with a :class:`CheckpointError`
that says what it holds and how to start that step again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkp.fsio import atomic_write, remove_orphaned_temps
from gkp.masked import mask_layers, masked_layers
from gkp.nn import GroupPlan, apply_per_group, apply_plans, grouped_plans, per_group_plans
from gkp.reshape import module_shapes, reshape_like

FORMAT = "gkp-bench-checkpoint/2"
STRUCTURE_KINDS = ("grouped_kernel", "per_group", "masked", "shapes")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (plain data and tensors) atomically, tagged with the file format."""
    path = Path(path)
    remove_orphaned_temps(path)  # a run owns its checkpoint files: no other writer is mid-write
    data = {"format": FORMAT, **payload}
    atomic_write(path, lambda handle: torch.save(data, handle))


def load_checkpoint(
    path: str | Path, kind: str | None = None, expect: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read a file written by :func:`save_checkpoint` with ``weights_only=True``.

    ``kind`` is the file's role ("baseline", "pruned", "finetuned", "progress"); ``expect`` maps
    keys of the file's ``meta`` to the values this run needs (model, dataset, ...). A missing,
    corrupt, foreign or mismatched file raises CheckpointError.
    """
    path = Path(path)
    redo = "delete it (or pass --restart) to redo that step"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; run `gkp-bench train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt and unsafe files
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"{path} is corrupt, unsafe to load, or not a GKP-Bench checkpoint "
            f"({type(err).__name__}: {first}); {redo}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a {FORMAT} file (found {found!r}; files of older versions stored "
            f"pickled modules and are no longer read); {redo}"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(
            f"{path} holds a {ckpt.get('kind')!r} checkpoint, not {kind!r}; {redo}"
        )
    meta = ckpt.get("meta")
    for key, want in (expect or {}).items():
        got = meta.get(key) if isinstance(meta, dict) else None
        if got != want:
            raise CheckpointError(
                f"{path} belongs to another run ({key} {got!r}, this run needs {want!r}); "
                f"use another --runs folder, or {redo}"
            )
    return ckpt


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The plain-data description of how ``model`` differs from its dense architecture.

    ``grouped_kernel``: the ``GroupPlan`` of every grouped layer; ``per_group`` (only when there
    are any): the plans of the ``PerGroupConv2d`` layers; ``masked``: the names of the
    plan-less ``MaskedConv2d`` layers (their masks are buffers in the state dict); ``shapes``:
    for a network without either (physically pruned filters/channels, or dense), the shape of
    every conv, BN and linear layer.
    """
    plans, masked = grouped_plans(model), masked_layers(model)
    out: dict[str, Any] = {
        "grouped_kernel": {n: p.to_dict() for n, p in plans.items()},
        "masked": masked,
    }
    split = per_group_plans(model)
    if split:  # only when present, so older models keep their digests
        out["per_group"] = {n: p.to_dict() for n, p in split.items()}
    if not plans and not masked and not split:
        out["shapes"] = module_shapes(model)
    return out


def rebuild(dense: nn.Module, structure: Mapping[str, Any], where: str = "checkpoint") -> nn.Module:
    """``dense`` (a fresh model of the right architecture) reshaped as ``structure`` says."""
    if not isinstance(structure, Mapping) or set(structure) - set(STRUCTURE_KINDS):
        raise CheckpointError(
            f"{where}: unknown model structure {structure!r:.200}; "
            f"known kinds: {', '.join(STRUCTURE_KINDS)}"
        )
    try:
        plans = {n: GroupPlan.from_dict(d) for n, d in structure.get("grouped_kernel", {}).items()}
        shapes = structure.get("shapes")
        model = reshape_like(dense, shapes) if shapes is not None else dense
        model = mask_layers(model, list(structure.get("masked", [])))
        split = {n: GroupPlan.from_dict(d) for n, d in structure.get("per_group", {}).items()}
        return apply_per_group(apply_plans(model, plans), split)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{where}: its pruning plans do not fit this model ({err})") from err


def load_weights(model: nn.Module, state: Any, where: str) -> nn.Module:
    """``model.load_state_dict(state)`` strictly; a mismatch raises CheckpointError."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} holds no state dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{where} does not fit this model ({first}); it belongs to another model or run"
        ) from err
    return model


def state_digest(model: nn.Module) -> str:
    """A content hash of the model's structure and every tensor of its state dict."""
    h = hashlib.sha256(json.dumps(structure_of(model), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
