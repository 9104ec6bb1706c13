"""The backbone contract every model honours: pooled features, ``num_features``, its
blocks in forward order (for "unfreeze the last N"), its preprocessing (size, mean/std, crop,
interpolation).

A leaf module: model files (timm and Hugging Face adapters, :mod:`raylens.models.small`)
build :class:`Backbone` objects and register their builders in
:mod:`raylens.models._registry`, so no model file imports another.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


class UnknownBackbone(ValueError):
    pass


Interpolation = Literal["bilinear", "bicubic", "nearest"]


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: square input side, RGB mean/std (0-1 scale), eval crop
    (resize the short side to ``size / crop_pct``, center crop), resize interpolation.

    ``mean``/``std`` are None when the checkpoint does not say (a Hugging Face model without
    an image processor config): a run must then set ``data.mean``/``data.std`` itself.
    """

    size: int
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    crop_pct: float = 0.875
    interpolation: Interpolation = "bilinear"


class Backbone(nn.Module):
    """A feature extractor: ``forward(x [b, 3, h, w]) -> [b, num_features]``."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        num_features: int,
        blocks: list[nn.Module],
        preprocess: Preprocess,
        pool: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        self.name = name
        self.net = net
        self.num_features = num_features
        self.preprocess = preprocess
        self._blocks = blocks
        self._pool = pool

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.net, x)

    def set_trainable(self, unfreeze_last_n: int | str = "all") -> None:
        """Freezes the backbone except its last ``unfreeze_last_n`` blocks.

        ``0``: fully frozen; ``N``: the last N blocks plus everything registered after them
        (final norms); ``"all"``: everything. Modules of frozen parts stay in eval mode
        only if the caller keeps them so (BatchNorm statistics are the caller's choice).
        """
        n_blocks = len(self._blocks)
        if unfreeze_last_n == "all":
            n = n_blocks
        elif isinstance(unfreeze_last_n, int) and 0 <= unfreeze_last_n <= n_blocks:
            n = unfreeze_last_n
        else:
            raise ValueError(
                f"unfreeze_last_n={unfreeze_last_n!r}: expected 'all' or 0..{n_blocks} "
                f"({self.name} has {n_blocks} blocks)"
            )
        params = list(self.net.named_parameters())
        if n == n_blocks:
            for _, p in params:
                p.requires_grad_(True)
            return
        for _, p in params:
            p.requires_grad_(False)
        if n == 0:
            return
        in_blocks = {id(p): i for i, b in enumerate(self._blocks) for p in b.parameters()}
        first_trainable = n_blocks - n
        last_block_param = max(i for i, (_, p) in enumerate(params) if id(p) in in_blocks)
        for i, (_, p) in enumerate(params):
            block = in_blocks.get(id(p))
            if (block is not None and block >= first_trainable) or i > last_block_param:
                p.requires_grad_(True)

    def trainable_fraction(self) -> float:
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / max(total, 1)


# ----------------------------------------------------------------------------- blocks


def find_blocks(net: nn.Module) -> list[nn.Module]:
    """A model's blocks in forward order.

    ViT-style ``blocks``; hierarchical models' stages (``stages``, ResNet ``layer1..4``);
    otherwise the longest list of same-type layers (HF encoders' ``layer``/``layers``).
    """
    if isinstance(getattr(net, "blocks", None), (nn.ModuleList, nn.Sequential)):
        return list(net.blocks)
    if isinstance(getattr(net, "stages", None), (nn.ModuleList, nn.Sequential)):
        return list(net.stages)
    layers = [getattr(net, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(x, nn.Module) for x in layers):
        return layers
    best: list[nn.Module] = []
    for _, mod in net.named_modules():
        same_type = (
            isinstance(mod, (nn.ModuleList, nn.Sequential)) and len({type(x) for x in mod}) == 1
        )
        if same_type and len(mod) > len(best):
            best = list(mod)
    if not best:
        raise ValueError(f"cannot find the blocks of {type(net).__name__}")
    return best


def local_weights(uri: str, storage=None) -> str:
    """A local path for ``uri``: itself if local, else a cached download (file or folder)."""
    from raylens.storage import Storage, split_uri

    scheme, path = split_uri(uri)
    if scheme == "file":
        if not os.path.exists(path):
            raise FileNotFoundError(f"weights not found: {uri!r}")
        return path
    storage = storage or Storage()
    cache = os.path.join(tempfile.gettempdir(), "raylens-weights", scheme, path)
    entries = storage.list_files(uri)
    if entries and not (len(entries) == 1 and entries[0].uri == uri):  # a folder
        for e in entries:
            dest = os.path.join(cache, os.path.relpath(split_uri(e.uri)[1], path))
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:
                    f.write(storage.read_bytes(e.uri))
        return cache
    if not os.path.exists(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "wb") as f:
            f.write(storage.read_bytes(uri))
    return cache
