"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory (local, ``s3://`` or ``gs://``)::

    model.safetensors       # model state dict: the weights to evaluate, serve and export
                            # (the EMA weights when ``train.ema_decay`` is on)
    train_model.safetensors # with model EMA only: the raw training weights (to resume)
    optimizer.safetensors   # optimizer tensors, keyed "state.<param idx>.<name>"
    state.json              # optimizer param groups + scalars, scheduler state, epoch,
                            # step, metrics, anything JSON the caller adds

``state.json`` is written last (atomically, like every file), so a directory without it
is incomplete. Loading reads only safetensors and JSON: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raylens.storage import Storage, join, split_uri

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
TRAIN_MODEL = "train_model.safetensors"


def _json_safe(value: Any) -> Any:
    """Scheduler/optimizer scalars as JSON (tensors → numbers, inf kept as a string)."""
    if isinstance(value, torch.Tensor):
        return _json_safe(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, tuple):  # e.g. Adam's betas: restored as a tuple, not a list
        return {"__tuple__": [_json_safe(v) for v in value]}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


def _from_json(value: Any) -> Any:
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits an optimizer state dict into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = _json_safe(value)
    return tensors, {"param_groups": _json_safe(state_dict["param_groups"]), "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(_from_json(values))
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


def save_checkpoint(
    storage: Storage,
    uri: str,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict | None = None,
    scheduler: dict | None = None,
    extra: dict | None = None,
    train_model: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes a checkpoint directory; ``extra`` (epoch, step, metrics, …) must be JSON-able.

    ``model`` is what every reader of a checkpoint uses (evaluation, Serve, export, teachers);
    ``train_model``, when training keeps a model EMA in ``model``, is the raw training
    weights that resuming continues from.
    """
    storage.write_bytes(join(uri, MODEL), st_save(_cpu(model)))
    if train_model is not None:
        storage.write_bytes(join(uri, TRAIN_MODEL), st_save(_cpu(train_model)))
    state: dict[str, Any] = {"extra": _json_safe(extra or {})}
    if optimizer is not None:
        tensors, meta = optimizer_to_flat(optimizer)
        storage.write_bytes(join(uri, OPTIMIZER), st_save(tensors))
        state["optimizer"] = meta
    if scheduler is not None:
        state["scheduler"] = _json_safe(scheduler)
    storage.write_text(join(uri, STATE), json.dumps(state, indent=1))


def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def load_checkpoint(storage: Storage, uri: str, *, with_optimizer: bool = True) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`.

    ``with_optimizer=False`` reads only what inference needs (``model``, scalars): no
    optimizer state and no raw training weights.

    Returns:
        ``{"model": state dict, "optimizer": state dict | None, "scheduler": dict | None,
        "extra": dict, "train_model": state dict | None}`` (``train_model``: the raw
        training weights of a run with model EMA, else None).
    Raises:
        FileNotFoundError: when the directory has no ``state.json`` (incomplete).
    """
    if not storage.exists(join(uri, STATE)):
        raise FileNotFoundError(f"no complete checkpoint at {uri!r} (missing {STATE})")
    state = json.loads(storage.read_text(join(uri, STATE)))
    out: dict[str, Any] = {
        "model": st_load(storage.read_bytes(join(uri, MODEL))),
        "optimizer": None,
        "scheduler": _from_json(state.get("scheduler")),
        "extra": _from_json(state.get("extra", {})),
        "train_model": None,
    }
    if with_optimizer and storage.exists(join(uri, TRAIN_MODEL)):
        out["train_model"] = st_load(storage.read_bytes(join(uri, TRAIN_MODEL)))
    if with_optimizer and "optimizer" in state:
        tensors = st_load(storage.read_bytes(join(uri, OPTIMIZER)))
        out["optimizer"] = optimizer_from_flat(tensors, state["optimizer"])
    return out


def copy_checkpoint(storage: Storage, src: str, dst: str) -> None:
    """Copies the checkpoint directory ``src`` to ``dst`` (replacing what is there), its
    ``state.json`` last, so ``dst`` reads as complete only once every file is in."""
    if not storage.exists(join(src, STATE)):
        raise FileNotFoundError(f"no complete checkpoint at {src!r} (missing {STATE})")
    storage.delete_tree(dst)
    root = split_uri(src)[1].rstrip("/") + "/"
    files = [split_uri(f.uri)[1][len(root) :] for f in storage.list_files(src)]
    for rel in sorted(files, key=lambda r: r == STATE):
        storage.write_bytes(join(dst, rel), storage.read_bytes(join(src, rel)))
