"""Backbone + head, built from the ``model`` config section."""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Parameter name -> layer ordinal, for timm's ``param_groups_layer_decay`` (layer-wise
        LR decay) and ``group_parameters``.

        A backbone with a timm ``group_matcher`` (any timm model) keeps its own layers
        (``coarse`` as timm's); any other backbone (``hf:``, registered) gets one layer per
        entry of ``Backbone.blocks``, with what comes before the first block (embeddings,
        stem) as layer 0, parameters between blocks in the next block and those after the
        last (final norms) in the last block, as timm's ViT. The head is always the last
        layer.
        """
        prefix = f"{BACKBONE_NET}."
        layer_of = backbone_layers(self.backbone, coarse)

        def match(name: str) -> tuple[float, ...]:
            if name.startswith(prefix) and name[len(prefix) :] in layer_of:
                return (float(layer_of[name[len(prefix) :]]),)
            return (math.inf,)  # the head: after every backbone layer

        return match

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-weight-decay names (timm's, e.g. ViT's ``pos_embed``)."""
        net = self.backbone.net
        names = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
        return {f"{BACKBONE_NET}.{n}" for n in names}


BACKBONE_NET = "backbone.net"  # where a Classifier's backbone network sits in its names


def backbone_layers(backbone: Backbone, coarse: bool = False) -> dict[str, int]:
    """``{parameter name in backbone.net: layer index}`` (see :meth:`Classifier.group_matcher`)."""
    net = backbone.net
    if hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        return group_parameters(net, net.group_matcher(coarse=coarse), reverse=True)
    block_of = {id(p): i for i, b in enumerate(backbone.blocks) for p in b.parameters()}
    layers: dict[str, int] = {}
    pending: list[str] = []  # after a block, in none: joins the next block (or the last)
    seen_block = False
    for name, p in net.named_parameters():
        if id(p) in block_of:
            seen_block = True
            layers[name] = block_of[id(p)] + 1
            layers.update(dict.fromkeys(pending, layers[name]))
            pending = []
        elif seen_block:
            pending.append(name)
        else:
            layers[name] = 0  # before the first block: the stem
    layers.update(dict.fromkeys(pending, len(backbone.blocks)))
    return layers


def build_model(cfg: ModelConfig, num_classes: int, storage=None) -> Classifier:
    """The model a run trains; raises (naming the key) on an unknown backbone or bad unfreeze."""
    backbone = create_backbone(
        cfg.backbone,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        storage=storage,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    try:
        backbone.set_trainable(cfg.unfreeze_last_n)
    except ValueError as err:
        raise ValueError(f"config key 'model.unfreeze_last_n': {err}") from None
    head = create_head(cfg.head, backbone.num_features, num_classes, dropout=cfg.head_dropout)
    return Classifier(backbone, head)
