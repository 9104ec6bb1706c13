"""Small CNNs registered as backbones, for CPU training on small images (28-64 px).

``vgg_s<w>``: three stages of two conv-BN-ReLU layers (widths w, 2w, 4w; 2x2 max-pool
between stages), global average pooling. ``vgg_s32`` has 0.29 M parameters and was the
fastest model to reach 0.94 validation top-1 on Fashion-MNIST on 2 CPU cores in the
recipe search behind ``jobs/configs/fashion_mnist.yaml``. Registered widths: 8, 16, 32, 48,
64 (``vgg_s8``, 0.02 M parameters, is the CPU distillation student).

They have no drop path and are too small for activation checkpointing to matter:
``model.drop_path_rate > 0`` or ``model.grad_checkpointing`` is refused by
:func:`raylens.models.backbones.create_backbone` rather than ignored.
"""

from __future__ import annotations

from torch import nn

from raylens.models._registry import register_backbone
from raylens.models.base import Backbone, Preprocess, local_weights

FMNIST_MEAN, FMNIST_STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)
# Fashion-MNIST's statistics at its native 28 px, no eval crop; bilinear is what every
# vgg_s run was trained with before interpolation was configurable.
PREPROCESS = Preprocess(28, FMNIST_MEAN, FMNIST_STD, 1.0, "bilinear")


def _cbr(ci: int, co: int) -> list[nn.Module]:
    return [nn.Conv2d(ci, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        a, b, c = width, 2 * width, 4 * width
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*_cbr(3, a), *_cbr(a, a)),
                nn.Sequential(nn.MaxPool2d(2), *_cbr(a, b), *_cbr(b, b)),
                nn.Sequential(nn.MaxPool2d(2), *_cbr(b, c), *_cbr(c, c)),
            ]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)


def _vgg_small(width: int):
    def build(*, pretrained: bool = False, weights: str | None = None, storage=None) -> Backbone:
        if pretrained:
            raise ValueError(f"vgg_s{width} has no hub weights; train it, or pass model.weights")
        net = VGGSmall(width)
        if weights:
            from safetensors.torch import load_file

            net.load_state_dict(load_file(local_weights(weights, storage)))
        return Backbone(
            f"vgg_s{width}",
            net,
            net.num_features,
            list(net.stages),
            PREPROCESS,
            lambda m, x: m(x),
        )

    return build


for _w in (8, 16, 32, 48, 64):
    register_backbone(f"vgg_s{_w}", preprocess=PREPROCESS)(_vgg_small(_w))
