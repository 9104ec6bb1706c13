"""The run config schema: one dataclass per section, every field documented.

YAML files and ``key.sub=value`` overrides are merged into :class:`RunConfig` by
:mod:`raylens.config`; ``python -m jobs.<job> --help`` prints this schema.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from raylens.config import ConfigError, opt

# The data.auto_augment vocabulary (built by raylens.data.augment): checked here, at config
# load, without importing timm.
AUTO_AUGMENT_FORMS = (
    "'rand-<sections>' (timm RandAugment, sections m<int>, n<int>, p<float>, mstd<float>, "
    "mmax<int>, inc<0|1>, t<weights|3a|3aw>; e.g. 'rand-m9-mstd0.5-inc1'), 'trivialaugment' "
    "or 'ta_wide' (torchvision TrivialAugmentWide), 'original', 'originalr', 'v0' or 'v0r' "
    "(timm AutoAugment policy, optionally '-mstd<float>', e.g. 'original-mstd0.5')"
)
TRIVIAL_AUGMENT = ("trivialaugment", "ta_wide")
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r")

_NUMBER = r"\d+(\.\d*)?"
_RAND_SECTION = re.compile(
    rf"(m\d+|n\d+|p{_NUMBER}|mstd{_NUMBER}|mmax\d+|inc[01]|t(weights|3a|3aw))"
)
_MSTD = re.compile(rf"mstd{_NUMBER}")


def check_auto_augment(spec: str) -> str:
    """Checks a timm-style auto-augment string without building it.

    Returns:
        Its kind: ``"rand"`` (RandAugment), ``"trivial"`` (TrivialAugmentWide) or ``"auto"``
        (AutoAugment).

    Raises:
        ConfigError: (a ``ValueError``) naming ``data.auto_augment`` and the accepted
            forms. timm itself skips sections it cannot parse (``'rand-foo'`` would silently
            be plain RandAugment), so this check is stricter than timm.
    """
    parts = spec.split("-") if isinstance(spec, str) else [None]
    head, rest = parts[0], parts[1:]
    if head == "rand" and all(_RAND_SECTION.fullmatch(s) for s in rest):
        return "rand"
    if spec in TRIVIAL_AUGMENT:
        return "trivial"
    if head in AUTO_AUGMENT_POLICIES and all(_MSTD.fullmatch(s) for s in rest) and len(rest) <= 1:
        return "auto"
    raise ConfigError(
        f"config key 'data.auto_augment': expected {AUTO_AUGMENT_FORMS}, got {spec!r}"
    )


# data.decode_reduce_gap's default, chosen for speed (benchmarks/RESULTS.md "Reduced-scale JPEG
# decoding"): at 224 px from 12 MP JPEGs 2.6-3.2x (train) / 4.0-4.5x (eval) less CPU than full
# decodes for a mean error of ~1 level in 255 (PSNR ~42 dB); 2.0: 2.0-2.6x / 3.3-3.7x, ~0.3.
DECODE_REDUCE_GAP = 1.0


def check_reduce_gap(gap: float) -> None:
    """Raises ConfigError unless ``gap`` is a finite number >= 1 (``data.decode_reduce_gap``)."""
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 1.0 <= gap < math.inf:
        raise ConfigError(
            f"config key 'data.decode_reduce_gap': expected a finite number >= 1, got {gap!r}"
        )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RunSection:
    name: str = opt(
        "",
        "Run name; a run dir is <output_dir>/<name>. Required by jobs.finetune and "
        "jobs.distill; jobs.tune names its sweep '<run.name or sweep>-tune' (tune.name wins). "
        "Printable ASCII, no '/' or '\\', not '.' or '..'.",
    )
    output_dir: str = opt("runs", "Where run dirs go: a local path, s3://bucket/prefix or gs://...")
    seed: int = opt(0, "Global seed (splits, augmentation, init).")

    def validate(self) -> None:
        check_run_name("run.name", self.name)
        check_output_dir("run.output_dir", self.output_dir)


# Object-store URIs as raylens.storage splits them (it imports this module, so the few
# lines of parsing the checks below need are here rather than imported from it).
_OBJECT_URI = re.compile(r"(s3|s3a|gs|gcs)://([^/]*)/?(.*)", re.IGNORECASE | re.DOTALL)
# Ray Train names a local directory after a run (<session>/artifacts/<run name>): one file
# name, at most 255 bytes on Linux, less what jobs.tune appends to derive names from it
# (<run.name>-tune, then <tune.name>-best for the retrain).
MAX_NAME_BYTES = 255 - len("-tune-best")


def _control_char(text: str) -> str | None:
    return next((c for c in text if ord(c) < 32 or ord(c) == 127), None)


def check_run_name(key: str, name: str) -> None:
    """Refuses a run (or experiment) name that cannot be one folder of a run dir on every
    backend, or that Ray Train cannot run under: any other printable ASCII character
    (``#``, ``?``, ``%``, ``+``, ``=``, spaces) works. (Unicode works in output dirs, datasets
    and every other key; Ray Train 2.60 fails on it in a run name, see below.)

    Raises:
        ConfigError: naming ``key``, the character and why it cannot work.
    """
    if not name:
        return  # required only by the jobs that create a run dir; they say so
    why = None
    if "/" in name:
        why = "'/' would nest the run dir in folders (a name is one folder of <output_dir>)"
    elif "\\" in name:
        why = "'\\' is a folder separator to some S3 servers (SeaweedFS lists it as '/')"
    elif name in (".", ".."):
        why = f"{name!r} names a folder that is not a new one"
    elif (c := _control_char(name)) is not None:
        why = (
            f"control character {c!r}: Ray Train names a local directory after the run, and "
            "S3 listings (XML) cannot return control characters (SeaweedFS lists \\x01 as "
            "U+FFFD)"
        )
    elif (c := next((c for c in name if not c.isascii()), None)) is not None:
        why = (
            f"non-ASCII character {c!r}: Ray Train 2.60 tags its metrics with the run name and "
            "Ray's metrics take ASCII only (its controller fails: 'ascii' codec can't encode)"
        )
    elif len(name.encode()) > MAX_NAME_BYTES:
        why = (
            f"{len(name.encode())} bytes in UTF-8, over {MAX_NAME_BYTES}: Ray Train names a "
            "local directory after the run (a file name holds 255 bytes, less what jobs.tune "
            "appends: -tune, -best)"
        )
    if why:
        raise ConfigError(f"config key {key!r}: {name!r} cannot be a run name: {why}")


def check_output_dir(key: str, uri: str) -> None:
    """Refuses an object-store output dir whose key Ray Train would rewrite: Ray joins its
    ``storage_path`` with ``pathlib`` (``Path(path).as_posix()``), which drops empty and
    ``.`` segments (``a//b``, ``a/./b`` become ``a/b``), so its checkpoints would land
    elsewhere than raylens' files; ``..`` segments are not resolved by object stores.

    Raises:
        ConfigError: naming ``key``, the character and why it cannot work.
    """
    match = _OBJECT_URI.fullmatch(uri or "")
    if match is None:
        return  # a local path (the OS resolves it alike for Ray and raylens)
    bucket, path = match.group(2), match.group(3).rstrip("/")
    why = None
    if not bucket:
        why = "no bucket (expected <scheme>://<bucket>/<prefix>)"
    elif path and any(seg in ("", ".", "..") for seg in path.split("/")):
        why = (
            "an empty, '.' or '..' folder in the key: Ray Train normalizes its storage path "
            "(a//b and a/./b become a/b) and object stores do not resolve '..', so Ray's "
            "files and raylens' would land in different places"
        )
    elif (c := _control_char(uri)) is not None:
        why = (
            f"control character {c!r}: S3 listings (XML) cannot return control characters "
            "(SeaweedFS lists \\x01 as U+FFFD)"
        )
    elif "\\" in path:
        why = "'\\' is a folder separator to some S3 servers (SeaweedFS lists it as '/')"
    if why:
        raise ConfigError(f"config key {key!r}: {uri!r} cannot hold run dirs: {why}")


@dataclass
class StorageConfig:
    s3_endpoint_url: str | None = opt(
        None, "S3 endpoint (e.g. http://127.0.0.1:8333); default: AWS_ENDPOINT_URL or AWS."
    )
    s3_region: str | None = opt(None, "S3 region; default: AWS_REGION / AWS_DEFAULT_REGION.")
    s3_access_key_id: str | None = opt(
        None, "S3 access key; default: AWS_ACCESS_KEY_ID. Never saved.", secret=True
    )
    s3_secret_access_key: str | None = opt(
        None, "S3 secret key; default: AWS_SECRET_ACCESS_KEY. Never saved.", secret=True
    )
    s3_anonymous: bool = opt(False, "Access S3 without credentials (public buckets).")
    gcs_endpoint_url: str | None = opt(
        None, "GCS endpoint (emulator); default: STORAGE_EMULATOR_HOST or Google."
    )
    gcs_credentials_file: str | None = opt(
        None, "Service-account JSON; default: GOOGLE_APPLICATION_CREDENTIALS."
    )
    gcs_anonymous: bool | None = opt(
        None, "Access GCS without credentials; default: true only for an emulator endpoint."
    )
    gcs_project: str | None = opt(None, "GCS project for bucket creation; default: from creds.")
    retry_seconds: float = opt(
        60.0,
        "How long one object-store call keeps retrying transient errors (connection refused, "
        "5xx, throttling), each try a new request, backoff 0.1 s doubling to 5 s; then it "
        "fails. Covers raylens' reads and writes and Ray Train/Tune's run storage. 0: only the "
        "S3 client's own 3 quick attempts.",
    )

    def validate(self) -> None:
        if not 0 <= self.retry_seconds <= 3600:
            raise ConfigError(
                f"config key 'storage.retry_seconds': expected 0..3600 s, got {self.retry_seconds}"
            )


@dataclass
class SourceConfig:
    uri: str = opt("", "Source to prepare: folder, manifest (.csv/.parquet), YOLO root, IDX dir.")
    kind: Literal["auto", "folder", "manifest", "yolo", "idx"] = opt(
        "auto", "Source layout; auto: manifest by suffix, idx/yolo/folder by contents."
    )
    yolo_classes: list[str] = opt(
        [],
        "YOLO class id -> name (index = id); required for kind=yolo unless a classes file exists.",
    )
    yolo_classes_file: str | None = opt(
        None, "YOLO id->name file (one name per line, or JSON/YAML list or mapping)."
    )
    extensions: list[str] = opt(
        [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"],
        "Image file suffixes listed from folders (case-insensitive).",
    )
    idx_verify_checksum: bool = opt(True, "Verify IDX (Fashion-MNIST) checksums before use.")


@dataclass
class PrepareConfig:
    output: str = opt("", "Prepared dataset dir (local, s3://, gs://). Required by jobs.prepare.")
    train_fraction: float = opt(0.8, "Train share when the source has no split.")
    val_fraction: float = opt(0.1, "Val share when the source has no split (or no val split).")
    test_fraction: float = opt(0.1, "Test share when the source has no split.")
    shard_rows: int = opt(10000, "Rows per Parquet shard (at most).")
    shard_bytes: int = opt(
        128 * 2**20,
        "Bytes of image data per Parquet shard (at most); also what jobs.prepare's peak memory "
        "follows (at most about 2x this above its imports).",
    )
    num_threads: int = opt(16, "Threads reading and validating images (I/O bound).")
    max_image_pixels: int = opt(
        64_000_000, "Images with more pixels are rejected as too_large (decompression-bomb guard)."
    )
    max_file_bytes: int = opt(64 * 2**20, "Files larger than this are rejected as too_large.")
    max_side: int | None = opt(
        None,
        "Longest side (pixels) of stored images: a larger one is stored re-encoded smaller "
        "(aspect kept; JPEG decoded reduced via DCT scaling, Lanczos resize, saved as JPEG "
        "quality 90, other formats as they were), counted in the dataset card and part of "
        "its fingerprint; the source files are never changed. null = off (bytes as in the "
        "source).",
    )
    overwrite: bool = opt(False, "Rebuild even when the output is up to date with the source.")
    mosaic_grid: int = opt(
        0,
        "Build multi-label mosaics: N x N tiles of a single-label source's images, labels = "
        "the classes present (0 = off; 2 = 2x2).",
    )
    mosaic_skew: float = opt(
        0.7, "Mosaics: the k-th class is drawn with weight skew**k (< 1: later classes rare)."
    )
    mosaic_empty: float = opt(0.25, "Mosaics: probability a cell is left empty (black).")
    mosaic_ratio: float = opt(
        1.0, "Mosaics per split = ratio x images in the split / cells (each image used ~ratio x)."
    )
    clutter_canvas: int = opt(
        0,
        "Cluttered canvases: each single-label image pasted at a random scale and position on "
        "a canvas of this side over fragments of other images, with noise (0 = off).",
    )
    clutter_scale: tuple[float, float] = opt(
        (0.46, 0.75), "Clutter: the item's side as a fraction of the canvas (range)."
    )
    clutter_fragments: int = opt(2, "Clutter: crops of other images of the split per canvas.")
    clutter_fragment_size: tuple[float, float] = opt(
        (0.36, 0.7), "Clutter: a fragment's side as a fraction of its source image (range)."
    )
    clutter_fragment_gain: float = opt(0.6, "Clutter: fragments' intensity factor (0-1).")
    clutter_brightness: tuple[float, float] = opt(
        (0.5, 1.2), "Clutter: the canvas's random brightness factor (range)."
    )
    clutter_noise: float = opt(12.0, "Clutter: Gaussian noise std, in 0-255 pixel units.")

    def validate(self) -> None:
        fracs = {
            "prepare.train_fraction": self.train_fraction,
            "prepare.val_fraction": self.val_fraction,
            "prepare.test_fraction": self.test_fraction,
        }
        for key, value in fracs.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"config key '{key}': expected a fraction in [0, 1], got {value}")
        if abs(sum(fracs.values()) - 1.0) > 1e-6:
            raise ConfigError(
                "config keys 'prepare.{train,val,test}_fraction': expected a sum of 1.0, "
                f"got {sum(fracs.values()):.4f}"
            )
        for key in ("shard_rows", "shard_bytes", "num_threads", "max_image_pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'prepare.{key}': expected a positive int")
        if self.max_side is not None and (
            isinstance(self.max_side, bool)
            or not isinstance(self.max_side, int)
            or self.max_side < 1
        ):
            raise ConfigError(
                "config key 'prepare.max_side': expected a positive int (pixels) or null (off), "
                f"got {self.max_side!r}"
            )
        if self.mosaic_grid == 1 or not 0 <= self.mosaic_grid <= 8:
            raise ConfigError(
                f"config key 'prepare.mosaic_grid': expected 0 (off) or 2..8, got {self.mosaic_grid}"
            )
        if not 0.0 <= self.mosaic_empty < 1.0:
            raise ConfigError(
                f"config key 'prepare.mosaic_empty': expected a probability in [0, 1), "
                f"got {self.mosaic_empty}"
            )
        if self.clutter_canvas and self.mosaic_grid:
            raise ConfigError(
                "config keys 'prepare.clutter_canvas' and 'prepare.mosaic_grid': "
                "expected at most one of them to be set"
            )
        if self.clutter_canvas < 0 or 0 < self.clutter_canvas < 8:
            raise ConfigError(
                "config key 'prepare.clutter_canvas': expected 0 (off) or a side >= 8 pixels, "
                f"got {self.clutter_canvas}"
            )
        for key in ("clutter_scale", "clutter_fragment_size"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(
                    f"config key 'prepare.{key}': expected 0 < low <= high <= 1, got {(lo, hi)}"
                )
        lo, hi = self.clutter_brightness
        if not 0.0 < lo <= hi:
            raise ConfigError(
                f"config key 'prepare.clutter_brightness': expected 0 < low <= high, got {(lo, hi)}"
            )
        if self.clutter_fragments < 0 or self.clutter_noise < 0:
            raise ConfigError(
                "config keys 'prepare.clutter_fragments' / 'prepare.clutter_noise': "
                "expected non-negative values"
            )
        if not 0.0 <= self.clutter_fragment_gain <= 1.0:
            raise ConfigError(
                "config key 'prepare.clutter_fragment_gain': expected a value in [0, 1], "
                f"got {self.clutter_fragment_gain}"
            )
        for key in ("mosaic_skew", "mosaic_ratio"):
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"config key 'prepare.{key}': expected a positive number, "
                    f"got {getattr(self, key)}"
                )


@dataclass
class DataConfig:
    dataset: str = opt("", "Prepared dataset dir, or a raw folder / manifest read directly.")
    image_size: int = opt(224, "Side of the square image fed to the model, in pixels.")
    eval_crop_pct: float | None = opt(
        None,
        "Eval: resize the short side to image_size/crop_pct, crop; null: the backbone's "
        "pretrained crop_pct (resolved values are saved in the run config).",
    )
    mean: tuple[float, float, float] | None = opt(
        None,
        "Per-channel mean (RGB, 0-1 scale); null: the backbone's pretrained config (timm "
        "pretrained_cfg, HF image processor).",
    )
    std: tuple[float, float, float] | None = opt(
        None, "Per-channel std (RGB, 0-1 scale); null: the backbone's pretrained config."
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = opt(
        None, "Resize interpolation (train crops and eval); null: the backbone's pretrained one."
    )
    decode_reduce: bool = opt(
        True,
        "Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the region resized "
        "to image_size (the seeded train crop, the eval center box) keeps >= decode_reduce_gap "
        "x image_size pixels a side at that scale: far less CPU on large photos, pixels close "
        "to a full decode. The scale is a function of the header size, the crop and these keys, "
        "so every replay picks the same. false: full decode (the pixels raylens made before).",
    )
    decode_reduce_gap: float = opt(
        DECODE_REDUCE_GAP,
        "decode_reduce: how many times image_size the reduced region must keep (>= 1, like "
        "Pillow's reducing_gap): 1 is fastest (12 MP to 224 px: ~1 level in 255 from a full "
        "decode), 2 is closer (~0.3) and slower, 3 or more rarely reduces.",
    )
    rrc_scale: tuple[float, float] = opt((0.08, 1.0), "Train random-resized-crop area range.")
    rrc_ratio: tuple[float, float] = opt((0.75, 1.3333333), "Train crop aspect-ratio range.")
    hflip: float = opt(0.5, "Train horizontal-flip probability.")
    augment: bool = opt(True, "Apply train augmentation to the train split (else eval transform).")
    auto_augment: str | None = opt(
        None,
        "Train: timm-style policy string: 'rand-m9-mstd0.5-inc1' (RandAugment), "
        "'trivialaugment' (TrivialAugmentWide), 'original' / 'v0' / 'originalr' (AutoAugment, "
        "optionally '-mstd0.5'); null: off. Seeded per sample, replayable.",
    )
    color_jitter: float | None = opt(
        None,
        "Train: brightness/contrast/saturation jitter strength (timm --color-jitter); ignored "
        "when auto_augment is set, as in timm. null: off.",
    )
    reprob: float = opt(0.0, "Train: random-erasing probability (timm --reprob); 0: off.")
    remode: Literal["const", "rand", "pixel"] = opt(
        "pixel", "Random erasing fill: const (the mean), rand (per channel), pixel (per pixel)."
    )
    recount: int = opt(1, "Random erasing: max erased boxes per image (timm --recount).")
    classes: list[str] = opt(
        [],
        "Train/evaluate on these classes only (names, single-label), relabelled in this "
        "order; empty: all classes.",
    )
    batch_size: int = opt(64, "Per-worker batch size delivered to the training loop.")
    decode_batch_size: int | None = opt(
        None, "Rows per Ray Data decode batch; null: ~16 MiB of decoded pixels (32-4096 rows)."
    )
    prefetch_batches: int = opt(2, "Batches prefetched by each worker's iterator.")
    shuffle_buffer: int = opt(2048, "Train: rows in each worker's local shuffle buffer (0: off).")
    preserve_order: bool = opt(
        False,
        "Hand blocks to the workers in a fixed order (Ray Data preserve_order), so a run with "
        "the same seed sees the same batches; off: blocks go out as they finish (faster when "
        "decode times vary).",
    )

    def decode_rows(self) -> int:
        """Rows per decode batch: fewer, larger Ray Data tasks amortize per-task overhead
        (4096 rows at 28 px ran 1.1x faster than 256 here), bounded by output bytes."""
        if self.decode_batch_size is not None:
            return self.decode_batch_size
        return max(32, min(4096, 16 * 2**20 // (3 * self.image_size**2)))

    def validate(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"config key 'data.image_size': expected >= 8, got {self.image_size}")
        if self.eval_crop_pct is not None and not 0.0 < self.eval_crop_pct <= 1.0:
            raise ConfigError("config key 'data.eval_crop_pct': expected a value in (0, 1]")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError("config key 'data.std': expected positive values")
        if not 0.0 <= self.reprob <= 1.0:
            raise ConfigError(f"config key 'data.reprob': expected [0, 1], got {self.reprob}")
        if self.recount < 1:
            raise ConfigError(f"config key 'data.recount': expected >= 1, got {self.recount}")
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment)
        check_reduce_gap(self.decode_reduce_gap)


@dataclass
class ModelConfig:
    backbone: str = opt(
        "resnet10t", "Backbone: a timm name, 'hf:<hub id or dir>', or a registered name."
    )
    pretrained: bool = opt(False, "Load pretrained weights from the hub (needs network).")
    weights: str | None = opt(None, "Weights file/dir (local, s3://, gs://) instead of the hub.")
    head: Literal["linear", "mlp"] = opt(
        "linear", "Head on pooled features (mlp: -> 512 -> classes)."
    )
    head_dropout: float = opt(0.0, "Dropout in the head.")
    unfreeze_last_n: int | Literal["all"] = opt(
        "all", "Trainable backbone blocks: 0 frozen, N the last N, 'all' full fine-tune."
    )
    channels_last: bool = opt(True, "channels_last memory format (faster convolutions).")
    drop_path_rate: float = opt(
        0.0,
        "Stochastic depth (drop path) rate, the last block's (timm ramps it over the blocks): "
        "timm models and HF models whose config has drop_path_rate; others refuse > 0.",
    )
    grad_checkpointing: bool = opt(
        False,
        "Activation (gradient) checkpointing in the backbone: less memory, more compute; "
        "timm models and HF models that support it, others refuse it.",
    )


@dataclass
class TaskConfig:
    name: Literal["classify", "multilabel", "distill", "metric"] = opt(
        "classify",
        "A registered task (raylens.tasks): classify (CE), multilabel, distill (a classifier "
        "trained against a teacher: distill.*), or metric (ProxyAnchor over frozen "
        "features: metric.*).",
    )
    label_smoothing: float = opt(0.0, "classify: cross-entropy label smoothing.")
    loss: Literal["focal", "bce"] = opt("focal", "multilabel: focal loss or plain BCE.")
    focal_alpha: float = opt(0.65, "multilabel focal: weight of positives (negative: off).")
    focal_gamma: float = opt(2.0, "multilabel focal: focusing exponent.")
    threshold: float = opt(0.5, "multilabel: probability at which a label is predicted.")


@dataclass
class DistillConfig:
    teacher: str = opt("", "Teacher run dir (local, s3://, gs://): its best checkpoint is used.")
    store: str = opt(
        "", "Teacher top-k store (written by jobs.teacher_logits, read by jobs.distill)."
    )
    aug_epochs: int = opt(
        10, "Augmentation epochs stored by the teacher pass; student epoch e replays e % E."
    )
    topk: int = opt(5, "Teacher classes kept per sample (k); the rest share 1 - sum(top-k).")
    mode: Literal["stored", "online"] = opt(
        "stored", "stored: top-k targets from the store; online: teacher forward every step."
    )
    loss: Literal["soft_ce", "kl"] = opt(
        "soft_ce", "soft_ce: TinyViT soft-target CE; kl: T^2 KL(teacher_T||student_T) + alpha CE."
    )
    temperature: float = opt(4.0, "kl: softmax temperature T.")
    alpha: float = opt(0.5, "kl: weight of the cross-entropy on hard labels.")
    teacher_batch_size: int = opt(256, "Teacher pass: images per teacher forward.")
    teacher_concurrency: int = opt(1, "Teacher pass: Ray Data actors holding the teacher.")
    teacher_num_gpus: float = opt(0.0, "Teacher pass: GPUs per teacher actor.")
    check_samples: int = opt(256, "teacher_logits --check: samples replayed per epoch.")

    def validate(self) -> None:
        for key in ("aug_epochs", "topk", "teacher_batch_size", "teacher_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'distill.{key}': expected >= 1")
        if self.temperature <= 0:
            raise ConfigError("config key 'distill.temperature': expected > 0")


@dataclass
class MetricConfig:
    backbones: list[str] = opt(
        [],
        "Frozen backbones whose pooled features are fused: registered/timm/hf: names or run "
        "dirs (their trained backbone), each at its own input size and normalization.",
    )
    cache: str = opt(
        "cache/features",
        "Feature cache root (local, s3://, gs://): one dir per (dataset version, backbone, "
        "preprocessing); reused while they are unchanged, recomputed when any changes.",
    )
    image_size: int | None = opt(
        None,
        "Input side for every backbone (their features are cached at it); null: each "
        "backbone's own (a run dir's data.image_size, a named backbone's pretrained size).",
    )
    train_classes: list[str] = opt(
        [],
        "Classes (names) trained on; the others are held out for retrieval evaluation. "
        "Empty: all classes are trained on.",
    )
    embedding_dim: int = opt(512, "Output embedding size (L2-normalized).")
    fusion: Literal["minimal", "medium", "deep"] = opt(
        "minimal", "Fusion head hidden widths: minimal 1024-512, medium 2048-1024-512, deep 4096-.."
    )
    fusion_hidden: list[int] = opt([], "Explicit fusion head hidden widths (overrides fusion).")
    gate: bool = opt(False, "Gating head: element-wise sigmoid weights over the features.")
    gate_hidden: int = opt(512, "Gating head hidden width.")
    dropout: float = opt(0.3, "Dropout in the fusion head.")
    activation: Literal["gelu", "relu", "silu"] = opt("gelu", "Fusion head activation.")
    margin: float = opt(0.1, "ProxyAnchor margin.")
    alpha: float = opt(32.0, "ProxyAnchor alpha (scale).")
    proxy_lr_mult: float = opt(100.0, "Proxies' learning rate as a multiple of train.lr.")
    miner: Literal["none", "multi_similarity"] = opt(
        "none", "Hard-example miner feeding ProxyAnchor (PML reweights mined samples)."
    )
    miner_epsilon: float = opt(0.1, "MultiSimilarityMiner epsilon.")
    recall_ks: list[int] = opt([1, 2, 4, 8], "Recall@K values reported.")
    cache_batch_size: int = opt(256, "Feature cache: images per backbone forward.")
    cache_concurrency: int = opt(1, "Feature cache: model actors per backbone.")
    cache_num_cpus: float = opt(1.0, "Feature cache: CPUs per model actor.")
    cache_num_gpus: float = opt(0.0, "Feature cache: GPUs per model actor.")

    def validate(self) -> None:
        if self.embedding_dim < 2:
            raise ConfigError("config key 'metric.embedding_dim': expected >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("config key 'metric.dropout': expected a value in [0, 1)")
        if any(w < 1 for w in self.fusion_hidden):
            raise ConfigError("config key 'metric.fusion_hidden': expected positive widths")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ConfigError("config key 'metric.recall_ks': expected positive integers")
        if self.proxy_lr_mult <= 0:
            raise ConfigError("config key 'metric.proxy_lr_mult': expected > 0")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(
                f"config key 'metric.image_size': expected null or >= 8, got {self.image_size}"
            )
        if len(set(self.backbones)) != len(self.backbones):
            raise ConfigError("config key 'metric.backbones': a backbone is listed twice")


@dataclass
class MixConfig:
    """Mixup / CutMix with timm's semantics (``timm.data.Mixup``)."""

    mixup_alpha: float = opt(0.0, "Mixup beta-distribution alpha; 0: no mixup.")
    cutmix_alpha: float = opt(0.0, "CutMix beta-distribution alpha; 0: no CutMix.")
    cutmix_minmax: tuple[float, float] | None = opt(
        None, "CutMix box size as min/max fraction of the image (overrides cutmix_alpha)."
    )
    prob: float = opt(1.0, "Probability of mixing a batch / pair / element.")
    switch_prob: float = opt(0.5, "With both on: probability of CutMix instead of mixup.")
    mode: Literal["batch", "pair", "elem"] = opt(
        "batch", "One lambda per batch, per pair (i, n-1-i), or per element."
    )

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (
            self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None
        )

    def validate(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'mix.{key}': expected >= 0")
        for key in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"config key 'mix.{key}': expected a value in [0, 1]")
        mm = self.cutmix_minmax
        if mm is not None and not 0.0 < mm[0] <= mm[1] <= 1.0:
            raise ConfigError(
                f"config key 'mix.cutmix_minmax': expected 0 < min <= max <= 1, got {list(mm)}"
            )


@dataclass
class TrainConfig:
    epochs: int = opt(10, "Training epochs.")
    optimizer: str = opt(
        "adamw",
        "Any timm.optim.create_optimizer_v2 name: adamw, sgd (Nesterov momentum), momentum, "
        "lamb, lion, adopt, ...",
    )
    lr: float = opt(1e-3, "Peak learning rate.")
    weight_decay: float = opt(0.05, "Weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam-family betas.")
    momentum: float = opt(0.9, "SGD-family momentum.")
    layer_decay: float | None = opt(
        None,
        "Layer-wise LR decay: block i of n gets lr * decay^(n - i) (timm "
        "param_groups_layer_decay; HF backbones by their block list); null: off.",
    )
    ema_decay: float | None = opt(
        None,
        "Model EMA (timm ModelEmaV3) decay, e.g. 0.9998; validation, the best checkpoint, test, "
        "serving and export then use the EMA weights. null: off.",
    )
    ema_warmup: bool = opt(False, "EMA decay warmup (ModelEmaV3 use_warmup).")
    compile: bool = opt(False, "torch.compile the model for training.")
    sync_bn: bool = opt(True, "Convert BatchNorm to SyncBatchNorm under multi-worker DDP.")
    keep_checkpoints: int | None = opt(
        2, "Checkpoints kept besides the best: the last N (Ray Train CheckpointConfig); null: all."
    )
    warmup_epochs: float = opt(1.0, "Linear warmup length in epochs (per-step schedule).")
    min_lr_ratio: float = opt(0.0, "Cosine floor as a fraction of lr.")
    scheduler: Literal["cosine", "plateau"] = opt(
        "cosine", "cosine (per step, after warmup) or plateau (ReduceLROnPlateau on the metric)."
    )
    grad_clip: float | None = opt(1.0, "Max gradient norm; null: no clipping.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt(
        "auto", "Mixed precision: auto = bf16 on CPU/Ampere+, fp16 on older GPUs."
    )
    patience: int | None = opt(None, "Early stopping: validations without improvement; null: off.")
    val_every_n_steps: int | None = opt(None, "Validate every N steps too; null: once per epoch.")
    best_metric: str | None = opt(
        None,
        "Validation metric selecting the best checkpoint (and early stopping); any the task "
        "reports, e.g. top1, f1_macro, recall_at_1, map_at_r, loss; null: top1 (classify, "
        "distill), f1_weighted (multilabel), the smallest recall_at_k (metric).",
    )
    max_steps_per_epoch: int | None = opt(None, "Cap steps per epoch (smoke tests).")
    precise_bn_batches: int = opt(
        0,
        "Before each validation, recompute BatchNorm running statistics over the last N "
        "training batches (precise BN; keeps those N batches in memory); 0: off. Training "
        "itself is unchanged.",
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("config key 'train.epochs': expected >= 1")
        if self.grad_accum < 1:
            raise ConfigError("config key 'train.grad_accum': expected >= 1")
        if self.lr <= 0:
            raise ConfigError("config key 'train.lr': expected > 0")
        if self.precise_bn_batches < 0:
            raise ConfigError("config key 'train.precise_bn_batches': expected >= 0 (0: off)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError("config key 'train.layer_decay': expected a value in (0, 1]")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("config key 'train.ema_decay': expected a value in (0, 1)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError("config key 'train.keep_checkpoints': expected >= 1 or null")


@dataclass
class EmbedConfig:
    model: str = opt(
        "",
        "A run dir (local, s3://, gs://; its best checkpoint) or a backbone name (vgg_s32, ...).",
    )
    checkpoint: str | None = opt(
        None,
        "Run dir model: checkpoint dir relative to it (checkpoints/epoch=3); null: the best checkpoint.",
    )
    output: str = opt("", "Output dir: Parquet files + _manifest.json (local, s3://, gs://).")
    splits: list[str] = opt([], "Dataset splits to embed (train, val, test); empty: all of them.")
    normalize: bool = opt(False, "L2-normalize each embedding to unit length.")
    include_logits: bool = opt(False, "Also write logits and probs columns (run-dir classifier).")
    image_size: int | None = opt(
        None, "Input side in pixels; null: the run's data.image_size or the backbone's own size."
    )
    amp: Literal["off", "bf16", "fp16"] = opt("off", "Autocast for the forward; off: exact fp32.")
    batch_size: int = opt(256, "Images per model forward, per actor.")
    concurrency: int = opt(1, "Model actors (each holds one copy of the model).")
    num_cpus: float = opt(1.0, "CPUs reserved per model actor; its torch threads = max(1, int).")
    num_gpus: float = opt(0.0, "GPUs per model actor (1 on a GPU cluster; 0: CPU).")
    rows_per_file: int = opt(100_000, "Target rows per output Parquet file (held by a writer).")

    def validate(self) -> None:
        for key in ("batch_size", "concurrency", "rows_per_file"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'embed.{key}': expected >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("config keys 'embed.num_cpus/num_gpus': expected >= 0")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(
                f"config key 'embed.image_size': expected >= 8, got {self.image_size}"
            )
        bad = [s for s in self.splits if s not in ("train", "val", "test")]
        if bad:
            raise ConfigError(
                f"config key 'embed.splits': unknown split(s) {bad}; train, val, test"
            )


@dataclass
class RayConfig:
    address: str | None = opt(None, "Ray address; null: join the job's cluster or start local.")
    num_workers: int = opt(1, "Ray Train workers (DDP ranks).")
    use_gpu: bool = opt(False, "One GPU per train worker.")
    cpus_per_worker: float | None = opt(
        None, "CPUs per train worker; null: budgeted so Ray Data always keeps CPUs."
    )
    data_cpus: float | None = opt(
        None,
        "CPUs reserved for Ray Data ingest; null: what explicit ray.cpus_per_worker leave "
        "(at least 1), else max(1, 25% of the cluster's CPUs).",
    )
    worker_resources: dict[str, float] = opt(
        {},
        "Custom Ray resources each train worker also asks for, e.g. {train_pool: 1}: the "
        "workers go only to nodes started with them (ray start --resources); {}: any node.",
    )
    local_num_cpus: int | None = opt(
        None, "Logical CPUs for a local ray.init; null: the machine's cores."
    )
    budget_cpus: float | None = opt(
        None,
        "CPUs this run plans over (workers + Ray Data); null: the whole cluster. jobs.tune "
        "sets it to each trial's share.",
    )
    max_failures: int = opt(
        1, "Times a dead worker group is restarted from the last checkpoint (-1: unlimited)."
    )
    stall_timeout_s: float | None = opt(
        600.0,
        "Stop a run with an error naming what holds the resources when, this many seconds on "
        "end, it reports nothing while tasks, actors or placement groups wait for resources "
        "(more than the time between two validations); null: wait for ever.",
    )

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("config key 'ray.num_workers': expected >= 1")
        if self.max_failures < -1:
            raise ConfigError("config key 'ray.max_failures': expected -1 (unlimited) or >= 0")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not amount > 0:
                raise ConfigError(
                    f"config key 'ray.worker_resources.{name}': expected a custom resource "
                    "name with an amount > 0 (CPUs and GPUs have keys of their own: "
                    "ray.cpus_per_worker, ray.use_gpu)"
                )
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise ConfigError(
                "config key 'ray.stall_timeout_s': expected seconds > 0, or null (no limit)"
            )


@dataclass
class TuneConfig:
    name: str = opt(
        "",
        "Experiment name; its dir is <output_dir>/<name>. Empty: <run.name>-tune. Printable "
        "ASCII, like run.name.",
    )
    output_dir: str = opt(
        "", "Where experiment dirs go (local, s3://, gs://). Empty: run.output_dir."
    )
    num_samples: int = opt(8, "Trials (configurations) in the sweep.")
    scheduler: Literal["asha", "fifo"] = opt(
        "asha", "asha: stop weak trials early at rungs; fifo: every trial runs every epoch."
    )
    grace_period: int = opt(1, "ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = opt(2.0, "ASHA: keep the top 1/reduction_factor at each rung.")
    max_concurrent: int | None = opt(
        None, "Trials at once; null: as many as the cluster's CPUs (and GPUs) hold."
    )
    cpus_per_trial: float | None = opt(
        None, "CPUs one trial plans over (workers + Ray Data); null: num_workers + 1."
    )
    seed: int | None = opt(None, "TPE sampler seed; null: run.seed.")
    n_startup_trials: int = opt(4, "TPE: random trials before the sampler models the results.")
    retrain: bool = opt(
        True, "After the sweep, retrain the best config as <name>-best and report its test split."
    )
    reproducible_trials: bool = opt(
        True,
        "Trials run with data.preserve_order=true: a config scores the same in any sweep "
        "(ASHA, FIFO, a resumed sweep), so schedulers compare configs, not data orders; "
        "results/best_config.yaml keeps it, so its retrain sees the best trial's data order.",
    )

    def validate(self) -> None:
        check_run_name("tune.name", self.name)  # Tune's experiment dir, named like a run dir
        check_output_dir("tune.output_dir", self.output_dir)
        if self.num_samples < 1:
            raise ConfigError("config key 'tune.num_samples': expected >= 1")
        if self.grace_period < 1:
            raise ConfigError("config key 'tune.grace_period': expected >= 1 epoch")
        if self.reduction_factor <= 1:
            raise ConfigError("config key 'tune.reduction_factor': expected > 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError("config key 'tune.max_concurrent': expected null or >= 1")
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 1:
            raise ConfigError(
                "config key 'tune.cpus_per_trial': expected > 1 (a train worker plus Ray Data)"
            )


@dataclass
class ExportConfig:
    run: str = opt(
        "", "Run dir written by jobs.finetune (local, s3://, gs://). Required by jobs.export."
    )
    checkpoint: str | None = opt(
        None,
        "Checkpoint dir relative to the run dir (checkpoints/epoch=N); null: the best checkpoint.",
    )
    output: str | None = opt(
        None, "Output dir (local, s3://, gs://); null: <run>/export. Re-running replaces it."
    )
    images: int = opt(32, "Real images of the run's dataset (test split, then val) to verify on.")
    atol: float = opt(
        1e-4, "Verification: absolute tolerance, |onnx - torch| <= atol + rtol*|torch|."
    )
    rtol: float = opt(1e-4, "Verification: relative tolerance (see atol).")
    opset: int = opt(
        18,
        "ONNX opset, 7 to the installed onnx's newest; below 18 the deprecated TorchScript "
        "exporter writes the model, else torch.export's.",
    )
    device: str = opt("cpu", "Device of the PyTorch reference: cpu or cuda[:N].")

    def validate(self) -> None:
        # what depends on the machine (onnx's newest opset, a CUDA device) is checked by
        # raylens.export.onnx_export.plan_export
        if self.images < 1:
            raise ConfigError(
                f"config key 'export.images': expected a count >= 1, got {self.images}"
            )
        for key in ("atol", "rtol"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"config key 'export.{key}': expected a finite tolerance >= 0, got {value}"
                )
        if self.opset < 7:
            raise ConfigError(
                f"config key 'export.opset': expected an ONNX opset >= 7, got {self.opset}"
            )
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"config key 'export.device': expected cpu or cuda[:N], got {self.device!r}"
            )


@dataclass
class RunConfig:
    """A raylens run: every job reads the sections it needs."""

    run: RunSection = opt(RunSection, "Run identity and output location.")
    storage: StorageConfig = opt(StorageConfig, "Object-storage endpoints and credentials.")
    source: SourceConfig = opt(SourceConfig, "Raw source read by jobs.prepare.")
    prepare: PrepareConfig = opt(PrepareConfig, "How jobs.prepare writes a dataset.")
    data: DataConfig = opt(DataConfig, "Ingest: dataset, transforms, batches.")
    model: ModelConfig = opt(ModelConfig, "Backbone and head.")
    task: TaskConfig = opt(TaskConfig, "Loss and metrics.")
    mix: MixConfig = opt(MixConfig, "Mixup / CutMix of training batches.")
    train: TrainConfig = opt(TrainConfig, "Optimization loop.")
    embed: EmbedConfig = opt(EmbedConfig, "Batch inference: embeddings (jobs.embed).")
    distill: DistillConfig = opt(DistillConfig, "Teacher targets and distillation loss.")
    metric: MetricConfig = opt(MetricConfig, "Metric learning over frozen backbone features.")
    ray: RayConfig = opt(RayConfig, "Cluster and resource budget.")
    tune: TuneConfig = opt(TuneConfig, "Hyperparameter sweep (jobs.tune).")
    export: ExportConfig = opt(ExportConfig, "ONNX export of a trained run (jobs.export).")

    def validate(self) -> None:
        for section in (
            self.run,
            self.storage,
            self.prepare,
            self.data,
            self.mix,
            self.train,
            self.distill,
            self.metric,
            self.ray,
            self.tune,
            self.export,
        ):
            section.validate()
