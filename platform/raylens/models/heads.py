"""Heads on pooled features: linear, and the xView seed's 2-layer MLP (features → 512 → classes)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def linear_head(in_features: int, num_classes: int, *, dropout: float = 0.0, **_) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def mlp_head(
    in_features: int, num_classes: int, *, dropout: float = 0.0, hidden: int = 512, **_
) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


HEADS: dict[str, Callable[..., nn.Module]] = {"linear": linear_head, "mlp": mlp_head}


def create_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    """A head by name; an unknown name raises listing the registered ones."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; registered: {sorted(HEADS)}")
    if num_classes < 1:
        raise ValueError(f"head {name!r}: expected at least 1 class, got {num_classes}")
    return HEADS[name](in_features, num_classes, **kwargs)
