"""The backbone registry: short name -> builder ``fn(*, pretrained, weights, storage)``, and
optionally its preprocessing, so a run config can be resolved without building the model.

A leaf (as timm's ``timm/models/_registry.py``): model files register into it, and
:func:`raylens.models.backbones.create_backbone` looks names up in it; importing
:mod:`raylens.models` imports every model file, so every built-in name is registered.
"""

from __future__ import annotations

from collections.abc import Callable

from raylens.models.base import Backbone, Preprocess

BACKBONES: dict[str, Callable[..., Backbone]] = {}
PREPROCESS: dict[str, Preprocess] = {}


def register_backbone(name: str, *, preprocess: Preprocess | None = None):
    """Registers a custom backbone builder ``fn(*, pretrained, weights, storage) -> Backbone``.

    ``preprocess``: what the built backbone's ``preprocess`` will be, so that
    :func:`raylens.models.backbones.backbone_preprocess` need not build it. A builder that
    also takes ``drop_path_rate`` / ``grad_checkpointing`` keywords receives them.
    """

    def wrap(fn):
        BACKBONES[name] = fn
        if preprocess is not None:
            PREPROCESS[name] = preprocess
        return fn

    return wrap


def parse_backbone_spec(spec: str) -> tuple[str, str | None]:
    """``name`` or ``name@weights-uri`` (a weights file/dir for a registered/timm/hf name)."""
    if "@" in spec and not spec.startswith(("s3://", "gs://", "/", ".")):
        name, weights = spec.split("@", 1)
        return name, weights or None
    return spec, None
