"""Preprocessing from the backbone: null data.mean/std/eval_crop_pct/interpolation resolve to
the backbone's pretrained values (timm pretrained_cfg, an HF image processor config, a
registered backbone's statistics) without building it, user-set values win, and a saved run
with null values is refused naming data.mean, never fed ImageNet statistics.

The Ray test trains a tiny CLIP tower for two steps and checks that its run config, Serve's
output and the ONNX export's preprocess.json carry CLIP's statistics and bicubic resize."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from raylens import config as C
from raylens.checkpoint import load_checkpoint
from raylens.config import ConfigError
from raylens.models import backbones as B
from raylens.models.backbones import backbone_preprocess, create_backbone
from raylens.models.small import FMNIST_MEAN, FMNIST_STD
from raylens.predict import Predictor, resolve_model
from raylens.preprocess import require_preprocess, resolve_preprocess
from raylens.schema import DataConfig, RunConfig
from raylens.serving.errors import ModelLoadError
from raylens.serving.loading import load_model
from raylens.serving.settings import load_settings
from raylens.storage import Storage
from raylens.train import finetune

import jobs.export as export_job
from tests.modelgen import tiny_hf
from tests.sourcegen import prepare_quiet, write_folder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-pre")
    tiny_hf("clip", root / "clip")
    tiny_hf("dinov3", root / "dinov3")
    tiny_hf("dinov3", root / "bare", processor=False)  # no preprocessor_config.json
    return {k: f"hf:{root / k}" for k in ("clip", "dinov3", "bare")}


def cfg_of(*overrides: str) -> RunConfig:
    return C.load(RunConfig, None, list(overrides))


def no_building(monkeypatch):
    """Building any model fails: what passes read metadata only."""

    def refuse(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(B, "_hf", refuse)


def test_timm_resolves_to_its_pretrained_cfg_without_building(monkeypatch):
    no_building(monkeypatch)
    for name in ("test_vit", "resnet10t", "vit_base_patch16_clip_224.openai"):
        want = timm.models.get_pretrained_cfg(name)
        cfg = resolve_preprocess(cfg_of(f"model.backbone={name}"))
        d = cfg.data
        assert (d.mean, d.std) == (tuple(want.mean), tuple(want.std)), name
        assert (d.eval_crop_pct, d.interpolation) == (want.crop_pct, want.interpolation), name
    # the tag decides: the CLIP-pretrained ViT gets CLIP's statistics, not ImageNet's
    assert d.mean == CLIP_MEAN and d.interpolation == "bicubic" and d.eval_crop_pct == 0.9


def test_hf_resolves_to_its_image_processor_config_without_building(hf, monkeypatch):
    no_building(monkeypatch)
    clip = resolve_preprocess(cfg_of(f"model.backbone={hf['clip']}")).data
    assert (clip.mean, clip.std) == (CLIP_MEAN, CLIP_STD)
    assert (clip.interpolation, clip.eval_crop_pct) == ("bicubic", 1.0)  # 32 of 32, bicubic
    dino = resolve_preprocess(cfg_of(f"model.backbone={hf['dinov3']}")).data
    assert (dino.mean, dino.std, dino.interpolation) == (*IMAGENET, "bilinear")


def test_registered_backbones_declare_their_statistics(monkeypatch):
    monkeypatch.setitem(B.BACKBONES, "vgg_s32", lambda **kw: pytest.fail("vgg_s32 was built"))
    d = resolve_preprocess(cfg_of("model.backbone=vgg_s32")).data
    assert (d.mean, d.std, d.eval_crop_pct, d.interpolation) == (
        FMNIST_MEAN,
        FMNIST_STD,
        1.0,
        "bilinear",
    )


@pytest.mark.parametrize("name", ["test_vit", "resnet10t", "vgg_s16", "clip", "dinov3", "bare"])
def test_metadata_matches_the_built_backbone(name, hf):
    name = hf.get(name, name)
    assert backbone_preprocess(name) == create_backbone(name).preprocess


def test_user_set_values_win_field_by_field(hf):
    cfg = resolve_preprocess(
        cfg_of(
            f"model.backbone={hf['clip']}",
            "data.mean=[0.5, 0.5, 0.5]",
            "data.interpolation=nearest",
        )
    )
    d = cfg.data
    assert d.mean == (0.5, 0.5, 0.5) and d.interpolation == "nearest"  # set: kept
    assert d.std == CLIP_STD and d.eval_crop_pct == 1.0  # null: CLIP's
    assert resolve_preprocess(cfg) == cfg  # idempotent


def test_a_backbone_without_statistics_needs_them_set(hf):
    with pytest.raises(ConfigError, match=r"config key 'data.mean' is null .* set data.mean"):
        resolve_preprocess(cfg_of(f"model.backbone={hf['bare']}"))
    d = resolve_preprocess(
        cfg_of(
            f"model.backbone={hf['bare']}", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"
        )
    ).data
    assert d.std == (0.2, 0.2, 0.2) and d.interpolation == "bilinear"


def test_a_metric_config_is_left_to_its_frozen_backbones():
    cfg = cfg_of("task.name=metric", "model.backbone=no-such-model")
    assert resolve_preprocess(cfg) is cfg


def test_a_saved_run_with_null_statistics_is_refused_naming_data_mean(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = cfg_of("run.name=run", "model.backbone=vgg_s8", "data.image_size=16")
    (run / "config.yaml").write_text(C.to_yaml(cfg))  # mean/std never resolved
    (run / "labels.json").write_text(json.dumps({"classes": ["a", "b"], "kind": "classify"}))
    (run / "best.json").write_text(json.dumps({"epoch": 1, "checkpoint": "ck", "metrics": {}}))
    (run / "ck").mkdir()
    (run / "ck" / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"run dir .*: config key 'data.mean' is null"):
        resolve_model(str(run))
    settings = load_settings({"models": [{"id": "r", "run": str(run)}]})
    with pytest.raises(ModelLoadError, match=r"config key 'data.mean' is null"):
        load_model(settings, Storage(), "r", device="cpu")
    with pytest.raises(ValueError, match=r"teacher run 'x': config key 'data.std' is null"):
        require_preprocess(DataConfig(mean=(0.5,) * 3), what="teacher run 'x'")


def test_a_run_recorded_before_interpolation_existed_loads_bilinear():
    # as written before this field: concrete mean/std/crop, no interpolation key at all
    old = DataConfig(image_size=16, eval_crop_pct=0.875, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert old.interpolation is None
    assert require_preprocess(old, what="run").interpolation == "bilinear"


def test_resuming_a_run_recorded_before_interpolation_keeps_its_bilinear(tmp_path):
    from raylens.rundir import RunDir

    storage = Storage()
    cfg = cfg_of("run.name=old", f"run.output_dir={tmp_path}", "model.backbone=resnet10t")
    old = C.to_dict(cfg)  # as saved before: ImageNet stats, 0.875, no interpolation key
    old["data"].update(mean=list(IMAGENET[0]), std=list(IMAGENET[1]), eval_crop_pct=0.875)
    del old["data"]["interpolation"]
    run = RunDir.of(cfg, storage)
    storage.write_text(run.path("config.yaml"), yaml.safe_dump(old))
    storage.write_text(run.path("metrics.jsonl"), '{"epoch": 1}\n')  # it has trained
    resolved = resolve_preprocess(cfg)  # test_vit: bicubic, crop 0.9
    with pytest.raises(ConfigError, match=r"data.interpolation: 'bilinear' -> 'bicubic'"):
        run.write_config(resolved)
    as_trained = C.apply_overrides(cfg, ["data.interpolation=bilinear", "data.eval_crop_pct=0.875"])
    run.write_config(resolve_preprocess(as_trained))  # the same training: it resumes


def test_a_bare_backbone_serves_with_its_own_preprocessing(hf):
    src = resolve_model(hf["clip"])
    assert (src.data.mean, src.data.std, src.data.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    assert src.data.image_size == 32 and src.data.eval_crop_pct == 1.0
    with pytest.raises(ConfigError, match=r"'data.mean' .* backbone 'hf:.*bare' has no image"):
        resolve_model(hf["bare"])


# ----------------------------------------------------------------------------- Ray


def _clip_reference(run: str, image: bytes) -> np.ndarray:
    """The run's classifier on ``image`` preprocessed by hand: short side to 32 bicubic,
    center crop, CLIP's statistics (what CLIP's own processor does at this size)."""
    from raylens.models.classifier import build_model

    cfg = C.load(RunConfig, Path(run, "config.yaml").read_text())
    best = json.loads(Path(run, "best.json").read_text())["checkpoint"]
    model = build_model(cfg.model, 3).eval()
    model.load_state_dict(load_checkpoint(Storage(), str(Path(run, best)))["model"])
    img = Image.open(io.BytesIO(image)).convert("RGB")  # 48 x 40
    img = img.resize((38, 32), Image.BICUBIC)
    left = (38 - 32) // 2
    x = np.asarray(img.crop((left, 0, left + 32, 32)), np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(2, 0, 1)[None])
    return torch.softmax(logits, 1)[0].numpy()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_clip_trains_serves_and_exports_with_clip_statistics(hf, tmp_path, ray_session):
    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=8)
    prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    cfg = cfg_of(
        "run.name=clip",
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.dataset={tmp_path / 'ds'}",
        f"model.backbone={hf['clip']}",
        "data.image_size=32",
        "data.batch_size=4",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "ray.num_workers=1",
    )
    assert cfg.data.mean is None  # nobody set it
    out = finetune(cfg)
    run = out["run_dir"]
    saved = C.load(RunConfig, Path(run, "config.yaml").read_text()).data
    assert (saved.mean, saved.std) == (CLIP_MEAN, CLIP_STD)
    assert (saved.interpolation, saved.eval_crop_pct) == ("bicubic", 1.0)

    pred = Predictor.load(run)
    assert (pred.data.mean, pred.data.interpolation) == (CLIP_MEAN, "bicubic")
    # Serve: its answer for a non-square image is the model on CLIP-preprocessed pixels
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(buf, "PNG")
    served = load_model(
        load_settings({"models": [{"id": "c", "run": run}]}), storage, "c", device="cpu"
    )
    probs = served.infer([buf.getvalue()])[0].probs
    np.testing.assert_allclose(probs, _clip_reference(run, buf.getvalue()), atol=1e-5)

    report = export_job.main([f"export.run={run}", "export.images=6"])
    assert report["passed"], report["failed_checks"]
    spec = json.loads(Path(run, "export", "preprocess.json").read_text())
    assert spec["normalize"]["mean"] == list(CLIP_MEAN)
    assert spec["normalize"]["std"] == list(CLIP_STD)
    assert spec["resize"]["interpolation"] == "bicubic" and spec["resize"]["shorter_side"] == 32
