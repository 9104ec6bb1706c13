"""A model for inference: a run dir's checkpoint, or a bare registered backbone.

    pred = Predictor.load("runs/fashion-mnist-vgg", storage)  # its best checkpoint
    pred = Predictor.load("vgg_s32", storage)                 # a backbone: pooled features only
    pixels, kept, failures = pred.preprocess(encoded_images)  # uint8 [n, 3, s, s], eval transform
    x = pred.normalize(torch.from_numpy(pixels))               # float32, the model's mean/std
    pred.embed(x)    # [b, D] pooled backbone features (Classifier.features), float32
    pred.logits(x)   # [b, C] (run dirs only)

The eval transform (size, crop, interpolation, mean/std) comes with the model: a run's
saved ``data`` section (concrete values, or a clear error naming the null key), or the
backbone's own preprocessing. :func:`resolve_model` checks a model spec
cheaply and returns a picklable :class:`ModelSource`, so a driver can fail on a bad path or
name before starting any Ray work and ship the source to the actors that load it.
Pure: no Ray.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from raylens.checkpoint import load_checkpoint
from raylens.data.transforms import ImageTransform, decode_and_transform, normalize
from raylens.models.backbones import BACKBONES, HF_PREFIX, Backbone, create_backbone
from raylens.models.classifier import Classifier, build_model
from raylens.preprocess import fill_data, require_preprocess
from raylens.rundir import METRIC, MULTILABEL, RunDir
from raylens.schema import DataConfig, ModelConfig
from raylens.storage import Storage

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to feed it; small and picklable (for Ray actors)."""

    kind: Literal["run", "backbone"]
    name: str  # the run dir URI, or the backbone name
    model: ModelConfig  # backbone (+ head for a run)
    data: DataConfig  # eval transform: image_size, eval_crop_pct, interpolation, mean, std
    dim: int  # embedding size (the backbone's num_features)
    classes: tuple[str, ...] = ()  # run dirs: class names in logit order
    multi_label: bool = False
    checkpoint: str | None = None  # run dirs: the checkpoint dir loaded
    seed: int = 0  # bare backbones without weights are initialized from this seed

    @property
    def model_id(self) -> str:
        """``<checkpoint URI>`` for a run, ``backbone:<name>[@weights]`` for a backbone."""
        if self.kind == "run":
            return str(self.checkpoint)
        weights = f"@{self.model.weights}" if self.model.weights else ""
        pretrained = "+pretrained" if self.model.pretrained and not weights else ""
        return f"backbone:{self.name}{weights}{pretrained}"

    @property
    def is_classifier(self) -> bool:
        return self.kind == "run"

    def transform(self) -> ImageTransform:
        return ImageTransform.from_config(self.data, train=False)


def is_run_dir_spec(spec: str) -> bool:
    """A URI or a path (``/``, ``.``, an existing dir) names a run dir; anything else a backbone."""
    if spec.startswith(HF_PREFIX) or ("://" not in spec and ":" in spec.split("/")[0]):
        return False  # hf:<id>, hf-hub:timm/<name>
    if "://" in spec or os.path.isdir(spec):
        return True
    return "/" in spec or spec.startswith(".") or spec.startswith("~")


def _inference_model_cfg(cfg: ModelConfig) -> ModelConfig:
    """The run's model config for rebuilding its architecture: the checkpoint holds every
    weight, so no hub download (a saved ``hf:`` weights dir still gives the architecture);
    no drop path or activation checkpointing, training-only and weightless."""
    keep_weights = cfg.backbone.startswith(HF_PREFIX) and cfg.weights
    return dataclasses.replace(
        cfg,
        pretrained=False,
        weights=cfg.weights if keep_weights else None,
        drop_path_rate=0.0,
        grad_checkpointing=False,
    )


def resolve_model(
    spec: str,
    storage: Storage | None = None,
    *,
    model_cfg: ModelConfig | None = None,
    checkpoint: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> ModelSource:
    """Checks a model spec and describes it: builds the architecture, reads no checkpoint.

    Args:
        spec: a run dir (local path, ``s3://``, ``gs://``) or a backbone name (registered,
            timm, ``hf:<hub id or dir>``).
        model_cfg: for a bare backbone, ``pretrained`` / ``weights`` / ``channels_last``.
        checkpoint: run dirs: checkpoint dir relative to the run dir; default: the best one.
        image_size: input side override; default: the run's ``data.image_size`` or the
            backbone's own.

    Raises:
        FileNotFoundError: a run dir, its files or its checkpoint are missing.
        ValueError: an unknown backbone (``UnknownBackbone``) or an unreadable run config.
    """
    storage = storage or Storage()
    if not spec:
        raise ValueError("config key 'embed.model' is required: a run dir or a backbone name")
    if not is_run_dir_spec(spec):
        base = model_cfg or ModelConfig()
        mcfg = dataclasses.replace(base, backbone=spec)
        backbone = create_backbone(
            spec, pretrained=False, weights=_arch_weights(mcfg), storage=storage
        )
        if spec in BACKBONES and (mcfg.pretrained or mcfg.weights):  # small: check them now
            create_backbone(spec, pretrained=mcfg.pretrained, weights=mcfg.weights, storage=storage)
        data = fill_data(
            DataConfig(image_size=image_size or backbone.preprocess.size),
            backbone.preprocess,
            source=f"backbone {spec!r}",
        )
        return ModelSource("backbone", spec, mcfg, data, int(backbone.num_features), seed=seed)

    what = f"run dir {spec!r}"
    rd = RunDir(spec, storage, what=what)
    run = rd.uri
    run_cfg = rd.config()
    labels = rd.labels()
    if labels["kind"] == METRIC:
        raise ValueError(
            f"{what} is a metric-learning run (fused frozen backbones): embed it with "
            "jobs.embed, which goes through its feature cache"
        )
    ck = rd.checkpoint(checkpoint, hint="set embed.checkpoint=checkpoints/epoch=N")
    mcfg = _inference_model_cfg(run_cfg.model)
    classes = tuple(labels["classes"])
    arch = build_model(mcfg, len(classes), storage)  # unknown backbone etc. fail here
    data = require_preprocess(run_cfg.data, what=what)  # as trained: no default assumed
    data = dataclasses.replace(data, image_size=image_size or data.image_size)
    return ModelSource(
        "run",
        run,
        mcfg,
        data,
        int(arch.backbone.num_features),
        classes=classes,
        multi_label=labels["kind"] == MULTILABEL,
        checkpoint=ck,
        seed=run_cfg.run.seed,
    )


def _arch_weights(cfg: ModelConfig) -> str | None:
    # An hf: architecture comes from its weights dir; other backbones build without weights.
    return cfg.weights if cfg.backbone.startswith(HF_PREFIX) else None


class Predictor:
    """A model in eval mode on one device, with its preprocessing.

    ``embed``/``logits`` take normalized float images ``[b, 3, s, s]`` (see
    :meth:`normalize`) and return float32 tensors on the CPU. ``amp`` autocasts the forward
    (``off``: exact fp32, the default).
    """

    def __init__(
        self,
        source: ModelSource,
        net: nn.Module,
        device: str | torch.device = "cpu",
        amp: Literal["off", "bf16", "fp16"] = "off",
    ):
        self.source = source
        self.device = torch.device(device)
        self.amp = AMP[amp]
        self.channels_last = source.model.channels_last
        net = net.to(self.device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.transform = source.transform()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_source(
        cls,
        source: ModelSource,
        storage: Storage | None = None,
        *,
        device: str | torch.device = "cpu",
        amp: Literal["off", "bf16", "fp16"] = "off",
    ) -> Predictor:
        """Builds the model and loads its weights (a run's checkpoint, or the backbone's)."""
        storage = storage or Storage()
        torch.manual_seed(source.seed)  # a backbone without weights: same init everywhere
        if source.kind == "run":
            net: nn.Module = build_model(source.model, len(source.classes), storage)
            state = load_checkpoint(storage, source.checkpoint, with_optimizer=False)["model"]
            net.load_state_dict(state)
        else:
            m = source.model
            net = create_backbone(
                m.backbone, pretrained=m.pretrained, weights=m.weights, storage=storage
            )
        return cls(source, net, device, amp)

    @classmethod
    def load(
        cls,
        spec: str,
        storage: Storage | None = None,
        *,
        model_cfg: ModelConfig | None = None,
        checkpoint: str | None = None,
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        amp: Literal["off", "bf16", "fp16"] = "off",
    ) -> Predictor:
        """:func:`resolve_model` + :meth:`from_source`."""
        source = resolve_model(
            spec, storage, model_cfg=model_cfg, checkpoint=checkpoint, image_size=image_size
        )
        return cls.from_source(source, storage, device=device, amp=amp)

    # ------------------------------------------------------------------ properties

    @property
    def classes(self) -> list[str]:
        """Class names in logit order; empty for a bare backbone."""
        return list(self.source.classes)

    @property
    def multi_label(self) -> bool:
        return self.source.multi_label

    @property
    def data(self) -> DataConfig:
        """The eval transform's settings (image_size, eval_crop_pct, interpolation, mean, std)."""
        return self.source.data

    @property
    def dim(self) -> int:
        return self.source.dim

    @property
    def backbone(self) -> Backbone:
        return self.net.backbone if isinstance(self.net, Classifier) else self.net

    # ------------------------------------------------------------------ inference

    def preprocess(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray, list]:
        """Encoded images → ``(uint8 [n_ok, 3, s, s], kept rows, [(row, reason)])``."""
        return decode_and_transform(images, self.transform, None)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [b, 3, s, s]`` → float32 normalized with the model's mean/std, on its device."""
        pixels = pixels.to(self.device, non_blocking=True)
        return normalize(pixels, self.data.mean, self.data.std)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[b, D]`` (float32, CPU)."""
        with self._autocast():
            feats = self.backbone(self._input(x))
        return feats.float().cpu()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[b, C]`` (float32, CPU); run dirs only."""
        return self.embed_and_logits(x)[1]

    @torch.inference_mode()
    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [b, D], logits [b, C])`` from one backbone pass (float32, CPU)."""
        if not isinstance(self.net, Classifier):
            raise ValueError(f"{self.source.model_id} is a bare backbone: it has no logits")
        with self._autocast():
            feats = self.net.backbone(self._input(x))
            logits = self.net.head(feats)
        return feats.float().cpu(), logits.float().cpu()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax for a single-label run, sigmoid for a multi-label one."""
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
