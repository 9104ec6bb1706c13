"""Models as the server holds them: one run dir (or bare backbone) → images in, results out.

    model = load_served_model(ModelEntry(id="fm", run="runs/fashion-mnist-vgg"), storage)
    outs = model.infer([png_bytes, jpeg_bytes])   # one batch: decode, eval transform, forward
    outs[0].embedding, outs[0].probs, outs[0].error

Kinds:

- ``classifier`` / ``multilabel``: a fine-tuned run (jobs.finetune). The embedding is the
  pooled backbone feature (what ``jobs.embed`` writes for the run); ``probs`` are the
  softmax (single-label) or sigmoids (multi-label, with the run's ``task.threshold``).
- ``metric``: a metric-learning run. Each frozen backbone sees the image through its own
  eval transform (as the feature cache did); the run's fusion model turns the L2-normalized,
  concatenated features into the unit-length embedding ``jobs.embed`` writes for it.
  Classes come from Nearest-Class-Mean prototypes (:mod:`raylens.serving.prototypes`).
- ``backbone``: a bare backbone, embeddings only.

Preprocessing is exactly the eval transform the run was trained with (its saved config).
Pure: no Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from raylens.checkpoint import load_checkpoint
from raylens.data.images import ImageRejected
from raylens.data.transforms import decode_transform
from raylens.models.backbones import parse_backbone_spec
from raylens.models.fusion import l2_concat
from raylens.predict import Predictor, is_run_dir_spec, resolve_model
from raylens.rundir import METRIC, RunDir
from raylens.serving.settings import ModelEntry, run_name
from raylens.storage import Storage
from raylens.tasks.metric import build_fusion

Kind = Literal["classify", "multilabel", "metric", "backbone"]  # raylens.rundir kinds


@dataclass
class Output:
    """One image's result: ``error`` set (and nothing else) when it could not be used."""

    embedding: np.ndarray | None = None  # float32 [D]
    probs: np.ndarray | None = None  # float32 [C] (classifier / multilabel)
    error: str | None = None


@dataclass
class ServedModel:
    """A loaded model with the eval transform(s) of its run."""

    id: str
    kind: Kind
    uri: str  # run dir (or backbone name)
    checkpoint: str | None
    dim: int
    classes: list[str] = field(default_factory=list)
    threshold: float = 0.5
    max_pixels: int = 40_000_000
    predictors: list[Predictor] = field(default_factory=list)
    fusion: torch.nn.Module | None = None

    @property
    def model_id(self) -> str:
        """What produced this model's outputs, as ``/v1/embed`` names it: ``<id>@<name>``,
        the served model id and the checkpoint dir's name for a run (``fm@epoch=7``),
        or the backbone's name for a bare backbone (``bb@vgg_s8``). An id, never a path:
        it is stable while the model serves the same checkpoint."""
        if self.checkpoint:
            return f"{self.id}@{run_name(self.checkpoint)}"
        return f"{self.id}@{run_name(parse_backbone_spec(self.uri)[0])}"

    def describe(self) -> dict:
        """What the ingress needs of the model. ``run`` and ``checkpoint`` are locations
        (for the Prototypes deployment), never put in a response."""
        return {
            "id": self.id,
            "model_id": self.model_id,
            "kind": self.kind,
            "run": self.uri,
            "checkpoint": self.checkpoint,
            "dim": self.dim,
            "classes": list(self.classes),
            "threshold": self.threshold,
            "image_size": [p.data.image_size for p in self.predictors],
        }

    # ------------------------------------------------------------------ inference

    def infer(self, images: list[bytes]) -> list[Output]:
        """Decodes and runs every image in one forward; an undecodable image gets an
        ``error`` and costs the others nothing."""
        return self.forward([self.preprocess(data) for data in images])

    def preprocess(self, data: bytes) -> list[np.ndarray] | str:
        """One image through each predictor's eval transform: ``uint8 [3, s, s]`` per
        predictor, or why it is unusable (``"<reason>: <detail>"``). A large JPEG decodes at
        reduced scale (libjpeg DCT scaling, the run's ``data.decode_reduce``) as the eval
        transform's center box allows (:func:`raylens.data.transforms.decode_transform`)."""
        try:
            transforms = [p.transform for p in self.predictors]
            return decode_transform(data, transforms, max_pixels=self.max_pixels)
        except ImageRejected as rej:
            return f"{rej.reason}: {rej.detail}"

    def forward(self, pixels: list[list[np.ndarray] | str]) -> list[Output]:
        """:meth:`preprocess`'s results → one forward for the usable ones."""
        outs = [Output() for _ in pixels]
        kept = [i for i, p in enumerate(pixels) if not isinstance(p, str)]
        for i, p in enumerate(pixels):
            if isinstance(p, str):
                outs[i].error = p
        if not kept:
            return outs
        feats, probs = self._forward([pixels[i] for i in kept])
        for j, i in enumerate(kept):
            outs[i].embedding = feats[j]
            if probs is not None:
                outs[i].probs = probs[j]
        return outs

    def _pixels(self, k: int, pred: Predictor, images: list[list[np.ndarray]]) -> torch.Tensor:
        """Predictor ``k``'s normalized batch of the preprocessed images."""
        return pred.normalize(torch.from_numpy(np.stack([img[k] for img in images])))

    def _forward(self, images: list) -> tuple[np.ndarray, np.ndarray | None]:
        if self.kind == "metric":
            blocks = [p.embed(self._pixels(k, p, images)) for k, p in enumerate(self.predictors)]
            device = next(self.fusion.parameters()).device
            with torch.inference_mode():
                emb = self.fusion(l2_concat(blocks).to(device))
            return emb.float().cpu().numpy(), None
        pred = self.predictors[0]
        x = self._pixels(0, pred, images)
        if self.kind == "backbone":
            return pred.embed(x).numpy(), None
        feats, logits = pred.embed_and_logits(x)
        return feats.numpy(), pred.probs(logits).numpy()


def load_served_model(
    entry: ModelEntry,
    storage: Storage,
    *,
    device: str = "cpu",
    amp: Literal["off", "bf16", "fp16"] = "off",
    max_pixels: int = 40_000_000,
) -> ServedModel:
    """Loads a run dir (classifier, multi-label or metric run) or a bare backbone.

    Raises:
        FileNotFoundError: the run dir, its config/labels or its checkpoint are missing.
        ValueError: an unloadable config or an unknown backbone.
    """
    if entry.backbone:
        pred = Predictor.load(entry.backbone, storage, device=device, amp=amp)
        return ServedModel(
            entry.id,
            "backbone",
            entry.backbone,
            None,
            pred.dim,
            max_pixels=max_pixels,
            predictors=[pred],
        )
    if not is_run_dir_spec(entry.run):
        raise ValueError(
            f"run {run_name(entry.run)!r} is not a run dir path or URI (expected a path with a "
            "'/', or an s3:// or gs:// URI)"
        )
    rd = RunDir(entry.run, storage, what=f"run {run_name(entry.run)!r}")
    run = rd.uri
    labels = rd.labels()  # FileNotFoundError: no run there (not trained yet)
    if labels["kind"] == METRIC:
        return _load_metric(entry, rd, labels, storage, device, amp, max_pixels)
    pred = Predictor.load(run, storage, checkpoint=entry.checkpoint, device=device, amp=amp)
    rcfg = rd.config()
    return ServedModel(
        entry.id,
        labels["kind"],
        run,
        pred.source.checkpoint,
        pred.dim,
        classes=pred.classes,
        threshold=rcfg.task.threshold,
        max_pixels=max_pixels,
        predictors=[pred],
    )


def _load_metric(
    entry: ModelEntry,
    rd: RunDir,
    labels: dict,
    storage: Storage,
    device: str,
    amp: str,
    max_pixels: int,
) -> ServedModel:
    """A metric run: its frozen backbones as the feature cache ran them, and its fusion model."""
    run = rd.uri
    rcfg = rd.config()
    ck = rd.checkpoint(entry.checkpoint)
    m = rcfg.metric
    predictors = []
    for spec in m.backbones:
        name, weights = parse_backbone_spec(spec)
        mcfg = dataclasses.replace(rcfg.model, backbone=name, weights=weights)
        source = resolve_model(
            name, storage, model_cfg=mcfg, image_size=m.image_size, seed=rcfg.run.seed
        )
        predictors.append(Predictor.from_source(source, storage, device=device, amp=rcfg.embed.amp))
    dims = [p.dim for p in predictors]
    if dims != labels.get("dims", dims):
        raise ValueError(
            f"model {entry.id!r}: backbone feature sizes {dims} differ from the run's "
            f"{labels['dims']} (its backbones changed since it was trained)"
        )
    fusion = build_fusion(rcfg, dims, len(labels["classes"]))
    fusion.load_state_dict(load_checkpoint(storage, ck, with_optimizer=False)["model"])
    fusion = fusion.to(device).eval()
    return ServedModel(
        entry.id,
        "metric",
        run,
        ck,
        int(m.embedding_dim),
        classes=list(labels["classes"]),
        max_pixels=max_pixels,
        predictors=predictors,
        fusion=fusion,
    )
