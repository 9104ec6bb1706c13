"""Fusion of frozen backbones' features into one metric embedding (pure PyTorch).

Input: the pooled features of several frozen backbones, each L2-normalized (so no
backbone dominates by scale) and concatenated (``dims`` gives each block's width).

    features ─► [gate: Linear→GELU→Linear→GELU→Linear→sigmoid, element-wise weights] ─►
    fusion head: (Linear → BatchNorm → activation → Dropout) × len(hidden) → Linear ─►
    L2-normalized embedding (``embedding_dim``, e.g. 512 or 1024)

Fusion head sizes (hidden widths): ``minimal`` 1024→512, ``medium`` 2048→1024→512,
``deep`` 4096→2048→1024→512; or any list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FUSION_SIZES: dict[str, tuple[int, ...]] = {
    "minimal": (1024, 512),
    "medium": (2048, 1024, 512),
    "deep": (4096, 2048, 1024, 512),
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def fusion_sizes(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Hidden widths for a fusion head name or an explicit list."""
    if isinstance(spec, str):
        if spec not in FUSION_SIZES:
            raise ValueError(
                f"unknown fusion head {spec!r}; expected one of {sorted(FUSION_SIZES)} "
                "or a list of hidden widths"
            )
        return FUSION_SIZES[spec]
    sizes = tuple(int(s) for s in spec)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"fusion head widths must be positive integers, got {list(spec)}")
    return sizes


class GatingHead(nn.Module):
    """Element-wise weights in (0, 1) over the concatenated features."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class FusionHead(nn.Module):
    """(Linear → BatchNorm → activation → Dropout) per hidden width, then Linear to the
    embedding."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        embedding_dim: int,
        dropout: float = 0.3,
        activation: str = "gelu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, embedding_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionModel(nn.Module):
    """Concatenated frozen features → (gate) → fusion head → unit-length embedding.

    ``criterion`` (optional): the metric loss module holding learnable proxies; kept on the
    model so the proxies are checkpointed with it and synchronized by DDP.
    """

    def __init__(
        self,
        dims: Sequence[int],
        embedding_dim: int = 512,
        hidden: str | Sequence[int] = "minimal",
        gate: bool = False,
        gate_hidden: int = 512,
        dropout: float = 0.3,
        activation: str = "gelu",
        criterion: nn.Module | None = None,
    ):
        super().__init__()
        self.dims = [int(d) for d in dims]
        if not self.dims or min(self.dims) < 1:
            raise ValueError(f"fusion input dims must be positive, got {list(dims)}")
        total = sum(self.dims)
        self.embedding_dim = int(embedding_dim)
        self.gate = GatingHead(total, gate_hidden) if gate else None
        self.head = FusionHead(total, fusion_sizes(hidden), embedding_dim, dropout, activation)
        self.criterion = criterion

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.gate is None else self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != sum(self.dims):
            raise ValueError(
                f"fusion model expects {sum(self.dims)} features ({' + '.join(map(str, self.dims))}"
                f"), got {x.shape[-1]}"
            )
        if self.gate is not None:
            x = x * self.gate(x)
        return F.normalize(self.head(x).float(), dim=1)

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefixes with their own learning-rate multiplier (see
        :func:`raylens.loop.build_optimizer`): the proxies, as in Proxy-Anchor."""
        mult = getattr(self.criterion, "lr_mult", None)
        return {"criterion.": float(mult)} if self.criterion is not None and mult else {}


def l2_concat(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each backbone's features L2-normalized, then concatenated (the fusion input)."""
    return torch.cat([F.normalize(b.float(), dim=1) for b in blocks], dim=1)


def embed_all(model: FusionModel, x: np.ndarray, batch: int = 4096) -> torch.Tensor:
    """The model's embeddings ``[n, embedding_dim]`` of fused features ``x`` ``[n, F]``."""
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[lo : lo + batch])))
    return torch.cat(out) if out else torch.zeros(0, model.embedding_dim)
