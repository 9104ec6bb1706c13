"""Backbones by short name, all honouring one contract.

    bb = create_backbone("tiny_vit_5m_224")             # any timm model name
    bb = create_backbone("hf:facebook/dinov3-vits16-pretrain-lvd1689m", pretrained=True)
    bb = create_backbone("hf:/models/clip-vit-b16")      # a save_pretrained directory
    feats = bb(images)                                   # [b, bb.num_features] pooled
    bb.blocks                                            # blocks in forward order
    bb.preprocess                                        # size, mean, std, crop_pct
    bb.set_trainable(unfreeze_last_n=3)                  # 0 frozen, N last blocks, "all"

Weights: ``pretrained=True`` loads from the hub (needs network); ``weights=`` loads a local
file, or an ``s3://`` / ``gs://`` one fetched first (timm: safetensors or a state dict via
``pretrained_cfg_overlay=dict(file=...)``; HF: a ``save_pretrained`` directory). Nothing is
unpickled: timm loads ``.safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raylens.schema import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_PREFIX = "hf:"


class UnknownBackbone(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: square input side, RGB mean/std (0-1 scale), eval crop."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875


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


# ----------------------------------------------------------------------------- builders


def _local_weights(uri: str, storage=None) -> str:
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


def _timm(name: str, *, pretrained: bool, weights: str | None, storage) -> Backbone:
    import timm

    kwargs: dict = {"num_classes": 0}
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": _local_weights(weights, storage)}
        pretrained = True
    net = timm.create_model(name, pretrained=pretrained, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=net)
    pre = Preprocess(
        int(cfg["input_size"][-1]),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        float(cfg.get("crop_pct", 0.875)),
    )
    return Backbone(name, net, int(net.num_features), find_blocks(net), pre, lambda m, x: m(x))


def _hf(name: str, *, pretrained: bool, weights: str | None, storage) -> Backbone:
    from transformers import AutoConfig, AutoModel

    source = weights or name[len(HF_PREFIX) :]
    local = "://" in source or os.path.exists(source)
    if local:
        source = _local_weights(source, storage)
    config = AutoConfig.from_pretrained(source)
    # A local save_pretrained dir carries weights; a hub id loads them only if pretrained
    # (otherwise: the hub config's architecture with random weights).
    net = (
        AutoModel.from_pretrained(source)
        if (pretrained or local)
        else AutoModel.from_config(config)
    )
    if hasattr(net, "vision_model") and not hasattr(net, "encoder"):
        net = net.vision_model  # a full CLIP model: keep the vision tower
    vcfg = getattr(config, "vision_config", config)
    is_clip = "clip" in config.model_type
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "preprocessor_config.json")):
        import json

        with open(os.path.join(source, "preprocessor_config.json")) as f:
            proc = json.load(f)
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))

    def pool(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return Backbone(
        name,
        net,
        int(vcfg.hidden_size),
        find_blocks(net),
        Preprocess(int(size), tuple(mean), tuple(std), 1.0 if is_clip else 0.875),
        pool,
    )


# ----------------------------------------------------------------------------- registry

BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str):
    """Registers a custom backbone builder ``fn(*, pretrained, weights, storage) -> Backbone``."""

    def wrap(fn):
        BACKBONES[name] = fn
        return fn

    return wrap


def create_backbone(
    name: str, *, pretrained: bool = False, weights: str | None = None, storage=None
) -> Backbone:
    """Builds a registered backbone, any timm model, or ``hf:<hub id or directory>``.

    Raises:
        UnknownBackbone: listing the registered names and how to name timm/HF models.
    """
    import raylens.models.small  # noqa: F401  (registers the built-in small CNNs)

    if name in BACKBONES:
        return BACKBONES[name](pretrained=pretrained, weights=weights, storage=storage)
    if name.startswith(HF_PREFIX):
        return _hf(name, pretrained=pretrained, weights=weights, storage=storage)
    import timm

    if timm.is_model(name):
        return _timm(name, pretrained=pretrained, weights=weights, storage=storage)
    import difflib

    close = difflib.get_close_matches(name, list(BACKBONES) + timm.list_models(), n=3)
    raise UnknownBackbone(
        f"unknown backbone {name!r}; registered: {sorted(BACKBONES) or '(none)'}, any timm model "
        f"(timm.list_models(), {len(timm.list_models())} names), or 'hf:<hub id or directory>'"
        + (f"; closest: {close}" if close else "")
    )
