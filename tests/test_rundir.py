"""The run dir module and the task registry (pure: no Ray, no servers)."""

from __future__ import annotations

import json

import pytest
import torch
from raylens import config as C
from raylens.checkpoint import save_checkpoint
from raylens.rundir import (
    BACKBONE,
    CLASSIFY,
    KINDS,
    METRIC,
    MULTILABEL,
    RunDir,
    absolute_paths,
    local_path,
)
from raylens.schema import RunConfig
from raylens.storage import Storage
from raylens.tasks import TASKS, create_task, get_task


def _cfg(*overrides: str) -> RunConfig:
    return C.load(RunConfig, None, ["run.name=r", *overrides])


def test_one_kind_vocabulary_and_legacy_labels_read_in_it(tmp_path):
    assert KINDS == ("classify", "multilabel", "metric") and BACKBONE == "backbone"
    run = RunDir(str(tmp_path / "r"))
    assert run.kind() is None and not run.is_run()
    run.write_labels(["a", "b"], MULTILABEL)
    assert run.labels() == {"classes": ["a", "b"], "kind": MULTILABEL} and run.is_run()
    with pytest.raises(ValueError, match="run kind 'classifier': expected one of"):
        run.write_labels(["a"], "classifier")
    # labels written before the vocabulary was unified
    for legacy, kind in (
        ("single_label", CLASSIFY),
        ("multi_label", MULTILABEL),
        ("metric", METRIC),
    ):
        (tmp_path / "r" / "labels.json").write_text(json.dumps({"classes": ["a"], "task": legacy}))
        assert run.kind() == kind


def test_missing_files_name_the_run_and_what_is_missing(tmp_path):
    run = RunDir(str(tmp_path / "none"), what="export.run 'x'")
    with pytest.raises(FileNotFoundError, match=r"export.run 'x': not a run dir \(no labels.json"):
        run.labels()
    with pytest.raises(FileNotFoundError, match="export.run 'x': no config.yaml there"):
        run.config()
    with pytest.raises(FileNotFoundError, match="no best.json .*still training.*; set x=y"):
        run.checkpoint(hint="set x=y")
    assert run.best() is None and run.history() == [] and run.checkpoints() == []


def test_history_best_and_checkpoints(tmp_path):
    storage = Storage()
    run = RunDir(str(tmp_path / "r"), storage)
    rows = [
        {"epoch": 1, "step": 5, "val/top1": 0.5, "checkpoint": "checkpoints/epoch=1"},
        {"epoch": 2, "step": 10, "val/top1": 0.7, "checkpoint": "checkpoints/epoch=2"},
    ]
    run.write_history(rows)
    run.write_best(rows[1])
    assert run.history() == rows
    assert run.best() == {
        "epoch": 2,
        "checkpoint": "checkpoints/epoch=2",
        "metrics": {"val/top1": 0.7},
    }
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .*epoch=2.*state.json"):
        run.checkpoint()  # best.json names it, but it was never persisted
    for epoch in (1, 2):
        save_checkpoint(storage, run.path(f"checkpoints/epoch={epoch}"), model={"w": torch.ones(1)})
    (tmp_path / "r" / "checkpoints" / "epoch=3").mkdir()  # incomplete: no state.json
    assert run.checkpoints() == ["checkpoints/epoch=1", "checkpoints/epoch=2"]
    assert run.checkpoint() == str(tmp_path / "r" / "checkpoints" / "epoch=2")
    assert run.checkpoint("checkpoints/epoch=1").endswith("epoch=1")
    run.write_test_metrics({"top1": 0.9})
    assert run.test_metrics() == {"top1": 0.9}


def test_the_resume_guard_refuses_another_training_config(tmp_path):
    cfg = _cfg(f"run.output_dir={tmp_path}")
    run = RunDir.of(cfg)
    assert run.uri == str(tmp_path / "r")
    run.write_config(cfg)
    run.write_config(cfg)  # nothing trained yet: rewritten freely
    run.write_history([{"epoch": 1}])
    run.write_config(C.apply_overrides(cfg, ["train.epochs=99", "ray.num_workers=2"]))
    with pytest.raises(C.ConfigError, match=r"another config \(train.lr: 0.001 -> 0.5\)"):
        run.write_config(C.apply_overrides(cfg, ["train.lr=0.5", "train.epochs=99"]))
    assert run.config().train.epochs == 99  # the refused config was not written


def test_local_paths_are_absolute_and_remote_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("runs/x/") == str(tmp_path / "runs" / "x")
    assert local_path(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert local_path("s3://b/runs/x/") == "s3://b/runs/x"
    cfg = absolute_paths(
        _cfg("metric.cache=cache", "metric.backbones=[vgg_s8, runs/t, 'vgg_s16@w.safetensors']")
    )
    assert cfg.metric.cache == str(tmp_path / "cache")
    assert cfg.metric.backbones == [
        "vgg_s8",
        str(tmp_path / "runs" / "t"),
        f"vgg_s16@{tmp_path / 'w.safetensors'}",
    ]


def test_every_task_declares_kind_pipeline_and_selection_metric():
    assert set(TASKS) == {"classify", "multilabel", "distill", "metric"}
    expect = {
        "classify": (CLASSIFY, "images", "top1"),
        "multilabel": (MULTILABEL, "images", "f1_weighted"),
        "distill": (CLASSIFY, "images", "top1"),
        "metric": (METRIC, "features", "recall_at_1"),
    }
    for name, (kind, pipeline, metric) in expect.items():
        spec, cfg = get_task(name), _cfg(f"task.name={name}")
        assert (spec.kind, spec.pipeline, spec.best_metric(cfg), spec.mode(cfg)) == (
            kind,
            pipeline,
            metric,
            "max",
        )
    cfg = _cfg("train.best_metric=loss")
    assert (
        get_task("classify").best_metric(cfg) == "loss" and get_task("classify").mode(cfg) == "min"
    )
    with pytest.raises(ValueError, match=r"unknown task 'clasify'.*did you mean 'classify'"):
        get_task("clasify")


def test_distill_task_trains_on_teacher_targets_and_validates_on_labels():
    cfg = _cfg("task.name=distill", "distill.loss=soft_ce")
    task = create_task(cfg, 3)
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    batch = {
        "teacher_idx": torch.tensor([[0, 1]]),
        "teacher_prob": torch.tensor([[0.5, 0.5]]),
        "label": torch.tensor([2]),
    }
    soft = task.train_loss(logits, batch, logits)
    expect = -(0.5 * torch.log_softmax(logits, 1)[0, :2]).sum()
    assert torch.allclose(soft, expect)
    assert torch.allclose(task.loss(logits, torch.tensor([2])), -torch.log_softmax(logits, 1)[0, 2])
    with pytest.raises(ValueError, match="the dataset has no classes"):
        create_task(cfg, 0)
