"""Every shipped config loads and validates; each GPU config trains 2 steps on CPU with a
tiny stand-in (small images, random init, tiny HF towers saved by the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from raylens import config as C
from raylens.schema import RunConfig
from raylens.storage import Storage
from raylens.train import finetune

from tests.modelgen import tiny_hf
from tests.sourcegen import prepare_quiet, write_folder

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
GPU = [
    "tiny_vit_5m_224",
    "dinov3_multilabel_focal",
    "clip_linear_probe",
    "clip_finetune",
    "distill_tiny_vit_5m",
]


def test_the_shipped_configs_are_all_here():
    names = {p.stem for p in CONFIGS}
    assert {"fashion_mnist", "fashion_mnist_mosaic", *GPU} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    text = path.read_text()
    cfg = C.load(RunConfig, text)
    raw = yaml.safe_load(text)
    # every key the file sets survives into the resolved config (nothing silently dropped)
    resolved = C.to_dict(cfg, redact=False)
    for section, values in raw.items():
        for key, value in values.items():
            got = resolved[section][key]
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    assert cfg.run.name
    if path.stem in GPU:
        assert cfg.ray.use_gpu and cfg.train.amp in ("bf16", "fp16")
    if path.stem == "dinov3_multilabel_focal":
        assert (cfg.task.name, cfg.task.loss, cfg.model.unfreeze_last_n) == (
            "multilabel",
            "focal",
            3,
        )
        assert cfg.model.head == "mlp" and cfg.train.best_metric == "f1_weighted"
    if path.stem == "clip_linear_probe":
        assert cfg.model.unfreeze_last_n == 0 and cfg.model.head == "linear"
    if path.stem == "tiny_vit_5m_224":
        assert cfg.model.backbone == "tiny_vit_5m_224" and cfg.data.image_size == 224


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-smoke")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=12)
    prepare_quiet(storage, str(root / "raw"), str(root / "single"))
    prepare_quiet(storage, str(root / "raw"), str(root / "multi"), mosaic_grid=2, mosaic_ratio=4)
    return {
        "root": root,
        "single": str(root / "single"),
        "multi": str(root / "multi"),
        "hf:facebook/dinov3-vits16-pretrain-lvd1689m": tiny_hf("dinov3", root / "dinov3") and
        f"hf:{root / 'dinov3'}",
        "hf:openai/clip-vit-base-patch16": tiny_hf("clip", root / "clip") and f"hf:{root / 'clip'}",
    }  # fmt: skip


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", GPU)
def test_gpu_config_trains_two_steps_on_cpu_with_a_tiny_stand_in(name, stand_ins, ray_session):
    cfg = C.load(RunConfig, (CONFIGS[0].parent / f"{name}.yaml").read_text())
    multi = cfg.task.name == "multilabel"
    backbone = stand_ins.get(cfg.model.backbone, cfg.model.backbone)  # timm: the real arch
    cfg = C.apply_overrides(
        cfg,
        [
            f"data.dataset={stand_ins['multi' if multi else 'single']}",
            f"run.output_dir={stand_ins['root'] / 'runs'}",
            f"model.backbone={backbone}",
            "model.pretrained=false",
            "data.image_size=32",  # the tiny stand-in size
            "data.batch_size=4",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.amp=auto",
            "ray.use_gpu=false",
            "ray.num_workers=1",
            "ray.cpus_per_worker=null",
        ],
    )
    distill = cfg.distill.teacher != ""
    if distill:  # a stand-in teacher (2 steps of vgg_s8), then online distillation
        teacher = finetune(
            C.apply_overrides(
                cfg, ["run.name=stand-in-teacher", "model.backbone=vgg_s8", "task.name=classify"]
            )
        )
        cfg = C.apply_overrides(
            cfg, [f"distill.teacher={teacher['run_dir']}", "distill.mode=online"]
        )
    out = finetune(cfg)
    rows = [json.loads(x) for x in Path(out["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2)]
    metric = "val/f1_weighted" if multi else "val/top1"
    assert 0.0 <= rows[0][metric] <= 1.0 and rows[0]["train/loss"] == rows[0]["train/loss"]
    assert Path(out["run_dir"], "checkpoints", "epoch=1", "model.safetensors").stat().st_size > 0
    assert Path(out["report"]).exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_gpu_metric_config_runs_on_cpu_with_tiny_stand_ins(stand_ins, ray_session):
    """jobs/configs/metric_gpu.yaml: its three backbones (tiny DINOv3 and CLIP towers, the
    timm ``test_convnext`` for ConvNeXt), each at its own preprocessing, cached and fused."""
    cfg = C.load(RunConfig, (CONFIGS[0].parent / "metric_gpu.yaml").read_text())
    assert cfg.task.name == "metric" and cfg.metric.gate and cfg.metric.fusion == "deep"
    assert len(cfg.metric.backbones) == 3 and cfg.metric.cache_num_gpus == 1
    root = stand_ins["root"]
    write_folder(Storage(), str(root / "raw30"), per_class=30)
    prepare_quiet(Storage(), str(root / "raw30"), str(root / "single30"))
    assert "dinov3" in cfg.metric.backbones[0] and "clip" in cfg.metric.backbones[1]
    backbones = [
        stand_ins["hf:facebook/dinov3-vits16-pretrain-lvd1689m"],
        stand_ins["hf:openai/clip-vit-base-patch16"],
        "test_convnext",
    ]
    cfg = C.apply_overrides(
        cfg,
        [
            f"data.dataset={root / 'single30'}",
            f"run.output_dir={root / 'runs'}",
            f"metric.cache={root / 'cache'}",
            f"metric.backbones=[{', '.join(backbones)}]",
            "metric.cache_num_gpus=0",
            "metric.fusion_hidden=[64, 32]",  # the deep head is 4096 wide: too slow here
            "model.pretrained=false",
            "data.batch_size=16",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.val_every_n_steps=null",
            "train.amp=auto",
            "ray.use_gpu=false",
        ],
    )
    out = finetune(cfg)  # task.name=metric goes to the metric run
    labels = json.loads(Path(out["run_dir"], "labels.json").read_text())
    assert labels["dims"] == [32, 32, 64] and len(labels["classes"]) == 3
    rows = [json.loads(x) for x in Path(out["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2)]
    assert 0.0 <= rows[0]["val/recall_at_1"] <= 1.0
    assert out["test"]["seen_test"]["ncm_top1"] >= 0.0
    assert Path(out["run_dir"], "prototypes.parquet").stat().st_size > 0
