"""Backbone + head, built from the ``model`` config section."""

from __future__ import annotations

import torch
from torch import nn

from raylens.models.backbones import Backbone, create_backbone
from raylens.models.heads import create_head
from raylens.schema import ModelConfig


class Classifier(nn.Module):
    """``forward(x [b, 3, s, s]) -> logits [b, num_classes]``; ``features`` gives pooled features."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(cfg: ModelConfig, num_classes: int, storage=None) -> Classifier:
    """The model a run trains; raises (naming the key) on an unknown backbone or bad unfreeze."""
    backbone = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, storage=storage
    )
    try:
        backbone.set_trainable(cfg.unfreeze_last_n)
    except ValueError as err:
        raise ValueError(f"config key 'model.unfreeze_last_n': {err}") from None
    head = create_head(cfg.head, backbone.num_features, num_classes, dropout=cfg.head_dropout)
    return Classifier(backbone, head)
