"""The run dir: the one module that knows its files, its layout and its kind.

A run dir is ``<run.output_dir>/<run.name>`` (a local path, ``s3://`` or ``gs://``)::

    config.yaml          the resolved run config (the resume guard compares against it)
    labels.json          {"classes": [...], "kind": classify|multilabel|metric, ...}
    metrics.jsonl        one row per report (train and validation metrics)
    best.json            {"epoch", "checkpoint", "metrics"}: the best checkpoint so far
    test_metrics.json    test-split metrics of the best checkpoint
    checkpoints/epoch=N/ model.safetensors, optimizer.safetensors, state.json (last);
                         with model EMA, model = EMA weights, train_model = raw ones
    checkpoints/best/    the best checkpoint, copied once it is older than the last
                         train.keep_checkpoints (which are all that is kept besides it)
    tensorboard/         TensorBoard event files
    report/              report.md + PNGs
    prototypes.parquet   metric runs: each class's mean train embedding
    .lease.json          the lease of the job writing the run now (raylens.lease)

Ray Train keeps its own run state in the same directory, so re-running the same command
with the same run name resumes. Every other module asks this one for names, kinds and
checkpoints; none spells a file name of its own. Pure: no Ray.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from raylens import config as C
from raylens.checkpoint import STATE
from raylens.lease import Lease, hold
from raylens.schema import RunConfig
from raylens.storage import Storage, join, split_uri

CONFIG = "config.yaml"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
BEST = "best.json"
TEST_METRICS = "test_metrics.json"
CHECKPOINTS = "checkpoints"
BEST_CHECKPOINT = f"{CHECKPOINTS}/best"  # the best, kept after it leaves the last N
TENSORBOARD = "tensorboard"
REPORT = "report"
PROTOTYPES = "prototypes.parquet"

# The run kind: what a run's model gives, one vocabulary everywhere (the run dir, Serve's
# "kind" field, export, Tune). A bare backbone served for embeddings is BACKBONE.
CLASSIFY, MULTILABEL, METRIC = "classify", "multilabel", "metric"
BACKBONE = "backbone"
KINDS = (CLASSIFY, MULTILABEL, METRIC)
# labels.json written before the kind vocabulary was unified stored the dataset's label type
_LEGACY_KINDS = {"single_label": CLASSIFY, "multi_label": MULTILABEL, "metric": METRIC}

# How runs recorded before data.interpolation existed resized images (train crops and eval).
LEGACY_INTERPOLATION = "bilinear"

# Keys a resumed run may change: where and how it runs, and how long (more epochs extend
# it: the cosine is recomputed over the new total at the resumed step), not what it trains.
RESUME_MAY_CHANGE = (
    "run.output_dir", "storage.", "source.", "prepare.", "embed.", "tune.", "ray.", "export.",
    "train.epochs", "train.patience", "train.val_every_n_steps",
    "data.decode_batch_size", "data.prefetch_batches", "distill.teacher_batch_size",
    "distill.teacher_concurrency", "distill.teacher_num_gpus", "distill.check_samples",
    "metric.cache",  # the location and the cache_* knobs; the features are keyed
)  # fmt: skip


def local_path(uri: str) -> str:
    """``uri`` as Ray workers and storage calls take it: a local path made absolute (workers
    run in other directories), a remote URI without its trailing ``/``."""
    scheme, path = split_uri(uri)
    return path if scheme == "file" else uri.rstrip("/")


def run_uri(cfg: RunConfig) -> str:
    """The run dir of a config: ``<run.output_dir>/<run.name>``."""
    return join(cfg.run.output_dir, cfg.run.name)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Every local path of a run config made absolute on the driver (output dir, dataset,
    teacher and its store, the feature cache and run-dir / weights backbones)."""
    from raylens.models.backbones import HF_PREFIX, parse_backbone_spec

    def local(uri: str) -> str:
        return split_uri(uri)[1] if uri and split_uri(uri)[0] == "file" else uri

    def backbone(spec: str) -> str:
        name, weights = parse_backbone_spec(spec)
        if "/" in name and not name.startswith(HF_PREFIX):  # a run dir
            name = local(name)
        return name if not weights else f"{name}@{local(weights)}"

    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, output_dir=local(cfg.run.output_dir)),
        data=dataclasses.replace(cfg.data, dataset=local(cfg.data.dataset)),
        distill=dataclasses.replace(
            cfg.distill, teacher=local(cfg.distill.teacher), store=local(cfg.distill.store)
        ),
        metric=dataclasses.replace(
            cfg.metric,
            cache=local(cfg.metric.cache),
            backbones=[backbone(b) for b in cfg.metric.backbones],
        ),
    )


def kind_of(labels: dict) -> str | None:
    """The run kind recorded in a run's labels (either vocabulary it was written in)."""
    kind = labels.get("kind")
    return kind if kind in KINDS else _LEGACY_KINDS.get(labels.get("task"))


class RunDir:
    """One run dir on any storage: read and write its files by meaning, not by name.

    ``what`` names the run in error messages (e.g. "run dir 'runs/x'", "--teacher ...").
    """

    def __init__(self, uri: str, storage: Storage | None = None, *, what: str | None = None):
        self.uri = local_path(uri)
        self.storage = storage or Storage()
        self.what = what or f"run dir {uri!r}"

    @classmethod
    def of(cls, cfg: RunConfig, storage: Storage | None = None) -> RunDir:
        return cls(run_uri(cfg), storage or Storage(cfg.storage))

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def lease(self, job: str) -> Lease:
        """The run dir's lease, for ``with``: one job trains a run at a time; a second
        (``job`` names the holder) is refused, naming the first (:mod:`raylens.lease`)."""
        name = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return hold(self.uri, self.storage, job=job, what=self.what, key="run.name", run=name)

    @property
    def tensorboard(self) -> str:
        return self.path(TENSORBOARD)

    @property
    def prototypes(self) -> str:
        return self.path(PROTOTYPES)

    def _json(self, name: str) -> Any:
        return json.loads(self.storage.read_text(self.path(name)))

    def _write_json(self, name: str, value: Any) -> None:
        self.storage.write_text(self.path(name), json.dumps(value, indent=1))

    # ------------------------------------------------------------------ config

    def write_config(self, cfg: RunConfig) -> None:
        """Writes the run config. Re-running a run name resumes that run, so a run dir that
        has trained (metrics recorded) under a config that differs in what it trains is
        refused, naming the keys: resuming would continue the old run's weights and then
        record the new config as how they were trained."""
        path = self.path(CONFIG)
        if self.storage.exists(self.path(METRICS)) and self.storage.exists(path):
            old = yaml.safe_load(self.storage.read_text(path)) or {}
            if isinstance(old.get("data"), dict) and cfg.data.interpolation is not None:
                # a key missing from an old config is no difference, but this one had a value
                old["data"].setdefault("interpolation", LEGACY_INTERPOLATION)
            diff = C.changed_keys(old, C.to_dict(cfg), ignore=RESUME_MAY_CHANGE)
            if diff:
                keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                raise C.ConfigError(
                    f"run dir {self.uri!r} already holds a run trained with another config "
                    f"({keys}); re-running a run name resumes that run. Choose another "
                    "run.name, or delete the run dir to start over"
                )
        self.storage.write_text(path, C.to_yaml(cfg))

    def config(self) -> RunConfig:
        """The run's saved config.

        Raises:
            FileNotFoundError: no config there (not a run dir). ValueError: it does not load.
        """
        try:
            text = self.storage.read_text(self.path(CONFIG))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.what}: no {CONFIG} there (expected a run dir written by "
                "jobs.finetune, jobs.distill or jobs.tune)"
            ) from None
        try:
            return C.load(RunConfig, text)
        except C.ConfigError as err:
            raise ValueError(f"{self.what}: its {CONFIG} does not load: {err}") from None

    # ------------------------------------------------------------------ labels and kind

    def write_labels(self, classes: list[str], kind: str, **extra: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"run kind {kind!r}: expected one of {list(KINDS)}")
        self._write_json(LABELS, {"classes": list(classes), "kind": kind, **extra})

    def is_run(self) -> bool:
        return self.storage.exists(self.path(LABELS))

    def labels(self) -> dict:
        """The run's labels (``classes``, ``kind`` and, for metric runs, ``held_out``,
        ``backbones``, ``dims``, ``embedding_dim``).

        Raises:
            FileNotFoundError: naming the run (not trained yet, or not a run dir).
        """
        try:
            labels = self._json(LABELS)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.what}: not a run dir (no {LABELS} in {self.uri!r}: train it first)"
            ) from None
        return {**labels, "kind": kind_of(labels)}

    def kind(self) -> str | None:
        """The run kind, or None where there is no (readable) run."""
        try:
            return self.labels()["kind"]
        except (FileNotFoundError, ValueError):
            return None

    # ------------------------------------------------------------------ history, best

    def history(self) -> list[dict]:
        """The metric rows (one per report); [] before the first report."""
        path = self.path(METRICS)
        if not self.storage.exists(path):
            return []
        text = self.storage.read_text(path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_history(self, rows: list[dict]) -> None:
        self.storage.write_text(self.path(METRICS), "".join(json.dumps(m) + "\n" for m in rows))

    def write_best(self, metrics: dict) -> None:
        """Records a report row as the best so far: its epoch, checkpoint, val metrics."""
        best = {
            "epoch": metrics["epoch"],
            "checkpoint": metrics["checkpoint"],
            "metrics": {k: v for k, v in metrics.items() if k.startswith("val/")},
        }
        self._write_json(BEST, best)

    def best(self) -> dict | None:
        """``{"epoch", "checkpoint", "metrics"}`` of the best checkpoint; None before one."""
        return self._json(BEST) if self.storage.exists(self.path(BEST)) else None

    def has_best(self) -> bool:
        return self.storage.exists(self.path(BEST))

    def write_test_metrics(self, metrics: dict) -> None:
        self._write_json(TEST_METRICS, metrics)

    def test_metrics(self) -> dict | None:
        ok = self.storage.exists(self.path(TEST_METRICS))
        return self._json(TEST_METRICS) if ok else None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, name: str | None = None, *, hint: str = "") -> str:
        """The URI of a complete checkpoint dir: ``name`` (relative to the run dir, e.g.
        ``checkpoints/epoch=3``), or the best one when None. Complete means its
        ``state.json`` exists (written last).

        Raises:
            FileNotFoundError: naming the run and what is missing; ``hint`` says how to
                name a checkpoint instead (e.g. "set embed.checkpoint=checkpoints/epoch=N").
        """
        if name is None:
            best = self.best()
            if best is None:
                raise FileNotFoundError(
                    f"{self.what}: no {BEST} at {self.path(BEST)!r} (no best checkpoint yet: "
                    f"is the run still training?)" + (f"; {hint}" if hint else "")
                )
            name = best["checkpoint"]
        ck = self.path(name)
        if not self.storage.exists(join(ck, STATE)):
            raise FileNotFoundError(
                f"{self.what}: no complete checkpoint at {ck!r} (missing {STATE})"
            )
        return ck

    def checkpoints(self) -> list[str]:
        """The run's complete checkpoints, relative to the run dir (``checkpoints/epoch=N``)."""
        root = self.path(CHECKPOINTS)
        names = {
            f.uri[len(root) :].strip("/").rsplit("/", 1)[0]
            for f in self.storage.list_files(root)
            if f.uri.endswith("/" + STATE)
        }
        return sorted(f"{CHECKPOINTS}/{n}" for n in names if n and "/" not in n)
