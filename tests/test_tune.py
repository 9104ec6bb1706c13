"""jobs.tune end to end: a real sweep (Ray Tune + Optuna + ASHA over TorchTrainer trials)
killed mid-way and resumed; concurrency fits the cluster; the outputs and the best config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raylens import config as C
from raylens.schema import RunConfig
from raylens.storage import Storage
from raylens.tune.space import load_space

from tests.sourcegen import prepare_quiet, write_folder

ROOT = Path(__file__).resolve().parents[1]
SPACE = (
    "space:\n"
    "  train.lr: {type: loguniform, low: 3.0e-3, high: 3.0e-2}\n"
    "  task.label_smoothing: {type: uniform, low: 0.0, high: 0.2}\n"
    "fixed:\n"
    "  train.warmup_epochs: 0.0\n"
)


def _plan(cluster, *overrides):
    from raylens.tune.sweep import plan_sweep

    cfg = C.load(RunConfig, None, ["run.name=t", *overrides])
    return plan_sweep(cfg, load_space(SPACE, cfg), cluster=cluster)


def test_concurrency_never_oversubscribes_the_cluster(tmp_path):
    # 1-CPU trials (one worker) on 2 CPUs: one at a time, Ray Data keeps the second CPU
    plan = _plan({"CPU": 2.0}, f"run.output_dir={tmp_path}")
    assert (plan.concurrency, plan.cpus_per_trial) == (1, 2.0)
    assert plan.metric == "val/top1" and plan.mode == "max"
    assert _plan({"CPU": 8.0}, "tune.num_samples=3").concurrency == 3  # no more than trials
    assert _plan({"CPU": 8.0}).concurrency == 4
    assert _plan({"CPU": 8.0}, "tune.max_concurrent=2").concurrency == 2
    assert _plan({"CPU": 9.0}, "ray.num_workers=2").concurrency == 3  # 2 workers + data
    assert _plan({"CPU": 8.0, "GPU": 1.0}, "ray.use_gpu=true").concurrency == 1
    with pytest.raises(ValueError, match="'tune.cpus_per_trial': a trial needs 3 CPUs"):
        _plan({"CPU": 2.0}, "tune.cpus_per_trial=3")
    with pytest.raises(ValueError, match="a trial needs 1 GPU"):
        _plan({"CPU": 8.0}, "ray.use_gpu=true")
    # metric and mode come from the task, not typed by hand
    multi = _plan({"CPU": 2.0}, "task.name=multilabel")
    assert (multi.metric, multi.mode) == ("val/f1_weighted", "max")
    metric = _plan({"CPU": 2.0}, "task.name=metric", "metric.recall_ks=[2, 4]")
    assert metric.metric == "val/recall_at_2"
    assert _plan({"CPU": 2.0}, "train.best_metric=loss").mode == "min"


def test_trials_read_data_in_a_fixed_order_unless_turned_off(tmp_path):
    from raylens.tune.sweep import trial_config

    plan = _plan({"CPU": 4.0}, f"run.output_dir={tmp_path}")
    cfg = trial_config(plan, "t_0001", {"train.lr": 0.01})
    assert cfg.data.preserve_order and cfg.train.lr == 0.01 and cfg.run.name == "t_0001"
    assert cfg.ray.budget_cpus == plan.cpus_per_trial and not plan.base.data.preserve_order
    off = _plan({"CPU": 4.0}, "tune.reproducible_trials=false")
    assert not trial_config(off, "t_0001", {}).data.preserve_order


def test_asha_and_tpe_rank_trials_by_their_best_value_so_far():
    from raylens.tune.sweep import with_best

    plan = _plan({"CPU": 2.0})
    assert plan.rank_metric == "val/top1_best"
    best, seen = None, []
    for value in (0.52, 0.74, 0.71, None, 0.76):
        row = with_best({"epoch": len(seen) + 1, "val/top1": value}, plan, best)
        best = row.get(plan.rank_metric)
        seen.append(best)
    assert seen == [0.52, 0.74, 0.74, 0.74, 0.76]  # a dip (or a missing value) keeps the best
    loss = _plan({"CPU": 2.0}, "train.best_metric=loss")
    assert with_best({"val/loss": 0.9}, loss, 0.7)["val/loss_best"] == 0.7
    assert with_best({"val/loss": 0.6}, loss, 0.7)["val/loss_best"] == 0.6
    assert plan.rank_metric not in with_best({"epoch": 1}, plan, None)


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=24)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    (root / "base.yaml").write_text(
        f"run: {{name: tiny, output_dir: {root / 'runs'}, seed: 0}}\n"
        f"data: {{dataset: {root / 'ds'}, image_size: 16, batch_size: 16, eval_crop_pct: 1.0}}\n"
        "model: {backbone: vgg_s8}\n"
        "train: {epochs: 3, lr: 0.003}\n"
        "ray: {local_num_cpus: 2}\n"
        "tune: {num_samples: 3, n_startup_trials: 2}\n"
    )
    (root / "space.yaml").write_text(SPACE)
    return root


def _finished(exp: Path) -> list[str]:
    """Trials whose run log ends with their final epoch."""
    out = []
    for log in exp.glob("trials/*/metrics.jsonl"):
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if rows and rows[-1].get("final"):
            out.append(log.parent.name)
    return out


def _tune(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", str(root / "base.yaml"),
            "--space", str(root / "space.yaml"), *extra]  # fmt: skip


@pytest.mark.faults
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_killed_mid_way_resumes_keeping_finished_trials(sweep_setup, no_ray_here):
    root = sweep_setup
    exp = root / "runs" / "tiny-tune"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen(_tune(root), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # fmt: skip
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None:
            if _finished(exp):
                break
            time.sleep(1)
        assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done_before = {t: (exp / "trials" / t / "metrics.jsonl").stat().st_mtime_ns
                   for t in _finished(exp)}  # fmt: skip
    assert done_before and not (exp / "results").exists()
    time.sleep(2)

    # Resuming with another space is refused (it would mix two sweeps)
    bad = subprocess.run(_tune(root, "--resume", "train.lr=0.01"), cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "differs from the sweep" in bad.stderr, bad.stderr[-2000:]
    out = subprocess.run(_tune(root, "--resume"), cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resuming" in out.stdout

    import pandas as pd

    results = exp / "results"
    trials = pd.read_parquet(results / "trials.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique  # none lost, none twice
    assert set(done_before) <= set(trials["trial_id"])
    for tid, mtime in done_before.items():  # finished trials were kept, not trained again
        assert (exp / "trials" / tid / "metrics.jsonl").stat().st_mtime_ns == mtime
        assert trials.set_index("trial_id").loc[tid, "status"] == "completed"
    assert (trials["status"] != "error").all(), trials.to_dict("records")
    assert trials["best"].between(0.0, 1.0).all() and (trials["epochs"] >= 1).all()
    assert set(pd.read_csv(results / "trials.csv")["trial_id"]) == set(trials["trial_id"])
    for png in ("metric_vs_epoch.png", "optimization_history.png", "param_importances.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # the Optuna study (journal beside the experiment) holds each trial once, none left open
    import optuna

    study = optuna.load_study(
        study_name="tiny-tune",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(exp / "optuna.journal"))
        ),
    )
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 3, states
    # the best config is a complete run config that jobs.finetune ran: test metrics
    summary = json.loads((results / "summary.json").read_text())
    cfg = C.load(RunConfig, (results / "best_config.yaml").read_text())
    assert cfg.run.name == "tiny-tune-best"
    assert cfg.train.lr == pytest.approx(summary["best"]["params"]["train.lr"])
    assert cfg.train.warmup_epochs == 0.0  # the space's fixed overrides are in it
    assert cfg.data.preserve_order  # the trials' fixed data order: a retrain repeats the trial
    retrained = json.loads((results / "best_retrained.json").read_text())
    assert retrained["test"]["top1"] >= 0.9, retrained
    assert Path(retrained["run_dir"], "test_metrics.json").exists()
    # the retrained run is that file, as jobs.finetune --config reads it (same loader)
    ran = C.load(RunConfig, Path(retrained["run_dir"], "config.yaml").read_text())
    assert ran.train == cfg.train and ran.model == cfg.model and ran.task == cfg.task
    assert ran.data.dataset == cfg.data.dataset and ran.run.name == cfg.run.name
    # 2 CPUs, 1-CPU trials: one trial at a time (each trial's run dir: start .. last write)
    spans = []
    for d in (exp / "trials").iterdir():
        end = max(p.stat().st_mtime for p in d.glob("*.json*"))
        spans.append(((d / "config.yaml").stat().st_mtime, end))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 1.0, spans
