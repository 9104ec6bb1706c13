"""The backbone registry: short name -> builder ``fn(*, pretrained, weights, storage)``.

A leaf (as timm's ``timm/models/_registry.py``): model files register into it, and
:func:`raylens.models.backbones.create_backbone` looks names up in it; importing
:mod:`raylens.models` imports every model file, so every built-in name is registered.
"""

from __future__ import annotations

from collections.abc import Callable

from raylens.models.base import Backbone

BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str):
    """Registers a custom backbone builder ``fn(*, pretrained, weights, storage) -> Backbone``."""

    def wrap(fn):
        BACKBONES[name] = fn
        return fn

    return wrap


def parse_backbone_spec(spec: str) -> tuple[str, str | None]:
    """``name`` or ``name@weights-uri`` (a weights file/dir for a registered/timm/hf name)."""
    if "@" in spec and not spec.startswith(("s3://", "gs://", "/", ".")):
        name, weights = spec.split("@", 1)
        return name, weights or None
    return spec, None
