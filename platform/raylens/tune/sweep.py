"""A hyperparameter sweep on Ray Tune: Optuna TPE (seeded) + ASHA (or FIFO) over a space.

Experiment directory (``<tune.output_dir>/<tune.name>``, local, ``s3://`` or ``gs://``)::

    sweep.json                 base config, space, metric/mode, concurrency (written first)
    optuna.journal             the Optuna study (journal storage: safe under parallel writers)
    trials/<trial_id>/         each trial is a normal run dir (config, metrics, checkpoints)
    <Tune's own experiment state and per-trial result logs>
    results/trials.parquet, trials.csv  every trial: params, best/last metric, epochs, status
    results/best_config.yaml   the best trial's full config, ready for ``jobs.finetune``
    results/optimization_history.png, param_importances.png, metric_vs_epoch.png
    results/best_retrained.json  the best config retrained as <name>-best, test metrics

Each trial is a Tune function trainable that runs the same ``TorchTrainer`` training as
``jobs.finetune`` (:func:`raylens.train.finetune`) with the trial's dotted overrides;
:class:`BestSoFarReport` forwards each epoch's report to Tune with the trial's best value
so far (``<metric>_best``, :attr:`SweepPlan.rank_metric`), which ASHA's rungs and TPE
compare: the sweep selects trials on their best epoch, and the latest epoch's value swings
by points at a high learning rate.

Resume (``--resume``) after the driver died: Tune restores its experiment state and the
searcher (whose study lives in the journal); a trial whose metric history ends with its
``final`` epoch (the last, or early stopping's) is never trained again (one that finished
after Tune's last state save reports its recorded result instead; Tune stops a trial at
its last report, so the run's own log is the record); unfinished trials resume from their
last epoch checkpoint.
ASHA's rungs are not restored by Ray (it stops trials, never pauses them), so after a
resume trials may run more epochs than ASHA would have allowed, never fewer, and no trial
is counted twice: each Tune trial is one Optuna trial and one row of the results.

When a trial ends (finished, stopped by ASHA, failed), :class:`ReleaseEndedTrials` stops
its Train run if it still runs and removes every placement group the run got, whether or
not Ray Train's placement-group cleaner does: a stopped trial's group that nobody removes
keeps its CPUs reserved, and the next trial's Ray Data tasks wait for them for ever (seen:
a 4-trial sweep hung after 2 trials while another local Ray broke Ray's cleaner).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raylens import config as C
from raylens.rundir import RunDir, absolute_paths
from raylens.runtime.launch import start_ledger
from raylens.schema import RunConfig
from raylens.storage import Storage, join, split_uri
from raylens.tasks import get_task
from raylens.tune.space import Space


@dataclass
class SweepPlan:
    base: RunConfig  # the run config with the space's fixed overrides applied
    space: Space
    exp_dir: str
    metric: str  # Tune metric key, e.g. "val/top1"
    mode: str  # "max" | "min"
    concurrency: int
    cpus_per_trial: float
    journal: str  # local path of the Optuna journal

    @property
    def rank_metric(self) -> str:
        """What ASHA and TPE compare: the trial's best :attr:`metric` up to this epoch."""
        return f"{self.metric}_best"

    @property
    def name(self) -> str:
        return self.exp_dir.rstrip("/").rsplit("/", 1)[-1]


def plan_sweep(cfg: RunConfig, space: Space, *, cluster: dict[str, float]) -> SweepPlan:
    """Experiment dir, metric/mode from the task, trial CPUs and concurrency that fit
    ``cluster`` (``{"CPU": n, "GPU": m}``) with CPUs left for each trial's Ray Data."""
    base = C.apply_overrides(cfg, space.fixed) if space.fixed else cfg
    base.validate()
    # Trials run in their own working dirs: local paths made absolute on the driver.
    base = absolute_paths(base)
    t = base.tune
    if t.output_dir and split_uri(t.output_dir)[0] == "file":
        t = dataclasses.replace(t, output_dir=split_uri(t.output_dir)[1])
        base = dataclasses.replace(base, tune=t)
    name = t.name or f"{base.run.name or 'sweep'}-tune"
    exp_dir = join(t.output_dir or base.run.output_dir, name)
    task = get_task(base.task.name)
    metric = task.best_metric(base)  # what the run's own model selection uses
    cpus = t.cpus_per_trial or float(base.ray.num_workers + 1)
    total = float(cluster.get("CPU", 1.0))
    if cpus > total:
        raise ValueError(
            f"config key 'tune.cpus_per_trial': a trial needs {cpus:g} CPUs "
            f"({base.ray.num_workers} worker(s) + Ray Data), the cluster has {total:g}"
        )
    fits = int(total // cpus)
    if base.ray.use_gpu:
        fits = min(fits, int(float(cluster.get("GPU", 0.0)) // base.ray.num_workers))
        if fits < 1:
            raise ValueError(
                f"ray.use_gpu: a trial needs {base.ray.num_workers} GPU(s), the cluster has "
                f"{cluster.get('GPU', 0):g}"
            )
    concurrency = min(t.max_concurrent or fits, fits, t.num_samples)
    scheme, path = split_uri(exp_dir)
    journal = (
        os.path.join(path, "optuna.journal")
        if scheme == "file"
        else os.path.join(os.path.expanduser("~/.cache/raylens/tune"), name, "optuna.journal")
    )
    return SweepPlan(
        base=base,
        space=space,
        exp_dir=path if scheme == "file" else exp_dir,
        metric=f"val/{metric}",
        mode=task.mode(base),
        concurrency=max(1, concurrency),
        cpus_per_trial=cpus,
        journal=journal,
    )


class DefineByRun:
    """OptunaSearch's define-by-run space (a picklable callable: the searcher is saved)."""

    def __init__(self, space: Space, base: RunConfig):
        self.space, self.base = space, base

    def __call__(self, trial) -> dict[str, Any]:
        return self.space.suggest(trial, self.base)


def trial_config(plan: SweepPlan, trial_id: str, params: dict[str, Any]) -> RunConfig:
    """A trial's run config: base + params, its run dir under ``trials/``, its CPU share
    and (``tune.reproducible_trials``) a fixed data order."""
    return C.apply_overrides(
        plan.base,
        {
            **params,
            "run.name": trial_id,
            "run.output_dir": join(plan.exp_dir, "trials"),
            "ray.budget_cpus": plan.cpus_per_trial,
            "ray.data_cpus": plan.base.ray.data_cpus or 1.0,
            **_same_data_order(plan),
        },
    )


def _same_data_order(plan: SweepPlan) -> dict[str, Any]:
    """``tune.reproducible_trials``: every trial, and the best config written after the
    sweep, read the data in one fixed order, so retraining the best config repeats its trial."""
    return {"data.preserve_order": True} if plan.base.tune.reproducible_trials else {}


def with_best(metrics: dict[str, Any], plan: SweepPlan, best: float | None) -> dict[str, Any]:
    """``metrics`` plus :attr:`SweepPlan.rank_metric`: the better of ``best`` and this
    report's value (``best`` alone when the report lacks the metric)."""
    value = metrics.get(plan.metric)
    if value is not None and value == value:
        better = min if plan.mode == "min" else max
        best = float(value) if best is None else better(best, float(value))
    return metrics if best is None else {**metrics, plan.rank_metric: best}


class BestSoFarReport(TuneReportCallback):
    """Ray Train → Tune report forwarding that adds the trial's best value so far."""

    def __init__(self, plan: SweepPlan, best: float | None):
        super().__init__()
        self.plan, self.best = plan, best

    def after_report(self, run_context, metrics, checkpoint):
        first = with_best(metrics[0], self.plan, self.best)
        self.best = first.get(self.plan.rank_metric)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(config: dict[str, Any], plan: SweepPlan, ledger=None) -> None:
    """The Tune function trainable: one ``TorchTrainer`` fit with the trial's overrides.
    ``ledger``: the sweep's :class:`~raylens.runtime.launch.RunLedger`, told the trial's
    controller and placement groups (:class:`ReleaseEndedTrials` releases them)."""
    from ray import tune

    from raylens.runtime.launch import RunWatch
    from raylens.train import finetune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, trial_id, config)
    history = RunDir(join(cfg.run.output_dir, trial_id), Storage(cfg.storage)).history()
    best = None  # a resumed trial's best so far includes its epochs before the resume
    for row in history:
        best = with_best(row, plan, best).get(plan.rank_metric)
    if history and history[-1].get("final"):  # finished before the driver died: never retrain
        tune.report(with_best(history[-1], plan, best))
        return
    callbacks = [BestSoFarReport(plan, best), RunWatch(cfg, ledger)]
    finetune(cfg, callbacks=callbacks, evaluate=False)


class ReleaseEndedTrials(tune.Callback):
    """A Tune callback (in the sweep's driver): once an ended trial's Train controller is
    gone, every placement group the trial's run got is removed
    (:func:`~raylens.runtime.launch.release_run`), whether or not Ray Train's cleaner did.

    Ray Train's cleaner (a detached actor per run) is meant to free a stopped trial's group
    when its controller dies with the trial, and may not: it stops cleaning when another
    local Ray runs on the machine, and may be turned off (``RAYLENS_PG_CLEANER=off``). A
    trial's controller still runs when Tune reports the trial ended (Tune then stops the
    trial, and the controller with it): each loop step checks the ended trials again, a
    controller still running :attr:`grace_s` later is aborted, and at the sweep's end every
    trial is released.
    """

    #: sweep name -> (ledger, log) of the sweep this driver runs. Tune saves its callbacks
    #: with the experiment and a resumed sweep gets them back: they find the resumed
    #: driver's ledger here, never a handle saved by a driver that died.
    active: dict[str, tuple[Any, Any]] = {}
    grace_s = 120.0
    every_s = 2.0

    def __init__(self, sweep: str):
        self.sweep = sweep
        self.ended: dict[str, float] = {}  # trial id -> when it ended
        self.checked = 0.0

    def __getstate__(self):
        return {"sweep": self.sweep}  # a resumed sweep starts with nothing pending

    def __setstate__(self, state):
        self.__init__(state["sweep"])

    def _release(self, run: str, running: str) -> bool:
        from raylens.runtime.launch import release_run

        if self.sweep not in self.active:
            return True
        ledger, log = self.active[self.sweep]
        return release_run(ledger, run, running=running, note=lambda m: log(f"[tune] {m}"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.checked < self.every_s:
            return
        self.checked = now
        for run, since in list(self.ended.items()):
            if self._release(run, "abort" if now - since > self.grace_s else "wait"):
                del self.ended[run]

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._release(trial.trial_id, "abort")
        self.ended.clear()


def held_placement_groups(ledger) -> list[str]:
    """The trials' placement groups not removed yet (``<id> (<trial>)``)."""
    owners = ray.get(ledger.owners.remote(), timeout=60)
    table = ray.util.placement_group_table()
    return [
        f"{pg[:8]} ({run})"
        for pg, (run, _) in owners.items()
        if table.get(pg, {}).get("state", "REMOVED") != "REMOVED"
    ]


def _searcher(plan: SweepPlan):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    os.makedirs(os.path.dirname(plan.journal), exist_ok=True)
    t = plan.base.tune
    seed = plan.base.run.seed if t.seed is None else t.seed
    return OptunaSearch(
        space=DefineByRun(plan.space, plan.base),
        metric=plan.rank_metric,
        mode=plan.mode,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=t.n_startup_trials),
        study_name=plan.name,
        storage=_journal(plan),
    )


def _scheduler(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = plan.base.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=plan.base.train.epochs,
        grace_period=min(t.grace_period, plan.base.train.epochs),
        reduction_factor=t.reduction_factor,
    )


def _trainable(plan: SweepPlan, ledger):
    from ray import tune

    # The trial's driver holds no CPU (Tune refuses an empty request, hence 1 byte of
    # memory): even a 0.01-CPU sliver leaves a 2-CPU cluster 0.99 CPU once the worker
    # holds 1, and Ray Data's 1-CPU decode tasks never start. Its TorchTrainer's workers
    # and Ray Data get their own resources; concurrency (max_concurrent_trials) keeps the
    # trials within the cluster: each plans over plan.cpus_per_trial.
    trainable = tune.with_parameters(run_trial, plan=plan, ledger=ledger)
    return tune.with_resources(trainable, {"cpu": 0, "memory": 1})


def run_sweep(plan: SweepPlan, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes the results; returns the summary."""
    from ray import tune

    storage = Storage(plan.base.storage)
    scheme, path = split_uri(plan.exp_dir)
    storage_path, name = path.rstrip("/").rsplit("/", 1)
    card = join(plan.exp_dir, "sweep.json")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often
    if get_task(plan.base.task.name).pipeline == "features":  # one cache for every trial
        from raylens.infer.features import ensure_cache

        ensure_cache(plan.base, storage)
    fs = storage.arrow_fs(scheme) if scheme != "file" else None  # Tune's: None = local
    if resume:
        if not storage.exists(card):
            raise FileNotFoundError(f"--resume: no sweep at {plan.exp_dir!r} (no sweep.json)")
        saved = json.loads(storage.read_text(card))
        if saved["config"] != C.to_dict(plan.base) or saved["space"] != plan.space.raw:
            raise ValueError(
                f"--resume: the config or space differs from the sweep at {plan.exp_dir!r}; "
                "resume with the same --config, --space and overrides"
            )
        exp_uri = f"{storage_path}/{name}" if scheme == "file" else plan.exp_dir
        if not tune.Tuner.can_restore(exp_uri, storage_filesystem=fs):
            raise FileNotFoundError(f"--resume: no Tune experiment state at {plan.exp_dir!r}")
        ledger = start_ledger()  # the trials' controllers and placement groups
        tuner = tune.Tuner.restore(
            exp_uri,
            trainable=_trainable(plan, ledger),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
        log(f"[tune] resuming {plan.exp_dir}")
    else:
        if storage.exists(card):
            raise FileExistsError(
                f"a sweep already exists at {plan.exp_dir!r}: pass --resume to continue it, "
                "or choose another tune.name"
            )
        storage.write_text(
            card,
            json.dumps(
                {
                    "config": C.to_dict(plan.base),
                    "space": plan.space.raw,
                    "metric": plan.metric,
                    "mode": plan.mode,
                    "concurrency": plan.concurrency,
                    "cpus_per_trial": plan.cpus_per_trial,
                    "journal": plan.journal,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
                indent=1,
            ),
        )
        ledger = start_ledger()
        tuner = tune.Tuner(
            _trainable(plan, ledger),
            tune_config=tune.TuneConfig(
                search_alg=_searcher(plan),
                scheduler=_scheduler(plan),
                num_samples=plan.base.tune.num_samples,
                max_concurrent_trials=plan.concurrency,
                metric=plan.rank_metric,
                mode=plan.mode,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                verbose=1,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[ReleaseEndedTrials(plan.name)],
            ),
        )
    t0 = time.time()
    ReleaseEndedTrials.active[plan.name] = (ledger, log)
    try:
        grid = tuner.fit()
        held = held_placement_groups(ledger)
        log(f"[tune] trials' placement groups still holding resources: {held or 'none'}")
    finally:
        ReleaseEndedTrials.active.pop(plan.name, None)
        ray.kill(ledger)
    log(f"[tune] {len(grid)} trials in {time.time() - t0:.0f} s")
    orphans = close_orphans(plan)
    if orphans:
        log(f"[tune] {orphans} Optuna trial(s) asked for before the driver died and never run: "
            "marked FAIL (not results)")  # fmt: skip
    return write_results(plan, grid, storage, log=log)


def close_orphans(plan: SweepPlan) -> int:
    """After the sweep, an Optuna trial still RUNNING was suggested after Tune's last state
    save and lost with the driver (the restored Tune re-asks instead). TPE's constant-liar
    would keep treating it as in flight: mark it FAIL. Returns how many."""
    import optuna

    study = _study(plan)
    if study is None:
        return 0
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in running:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(running)


def _journal(plan: SweepPlan):
    """The sweep's Optuna journal storage (a local file, safe under parallel writers)."""
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(plan.journal))


def _study(plan: SweepPlan):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not os.path.exists(plan.journal):
        return None
    try:
        return optuna.load_study(study_name=plan.name, storage=_journal(plan))
    except (KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- results


def trial_rows(plan: SweepPlan, grid) -> list[dict[str, Any]]:
    """One row per trial: params, best and last metric, epochs run, status."""
    rows = []
    epochs = plan.base.train.epochs
    lower = plan.mode == "min"
    for result in grid:
        df = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
        values = [] if df is None or plan.metric not in df else df[plan.metric].dropna().tolist()
        ran = 0 if df is None or "epoch" not in df else int(df["epoch"].max())
        if result.error is not None:
            status = "error"
        elif ran >= epochs:
            status = "completed"
        else:
            status = "stopped"  # by the scheduler (ASHA) before its last epoch
        row = {
            "trial_id": trial_id,
            "status": status,
            "epochs": ran,
            "best": (min(values) if lower else max(values)) if values else math.nan,
            "last": values[-1] if values else math.nan,
            "error": str(result.error)[:500] if result.error is not None else "",
        }
        for key in plan.space.keys:
            row[key] = (result.config or {}).get(key)
        row["curve"] = json.dumps(values)
        rows.append(row)
    return rows


def write_results(plan: SweepPlan, grid, storage: Storage, log=print) -> dict[str, Any]:
    import pandas as pd

    rows = trial_rows(plan, grid)
    out = join(plan.exp_dir, "results")
    df = pd.DataFrame(rows)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(join(out, "trials.parquet"), buf.getvalue())
    storage.write_text(join(out, "trials.csv"), df.to_csv(index=False))
    ok = [r for r in rows if r["status"] != "error" and not math.isnan(r["best"])]
    if not ok:
        raise RuntimeError(f"sweep {plan.exp_dir!r}: no trial reported {plan.metric}")
    best = (min if plan.mode == "min" else max)(ok, key=lambda r: r["best"])
    params = {k: best[k] for k in plan.space.keys if best[k] is not None and best[k] == best[k]}
    best_cfg = C.apply_overrides(
        plan.base, {**params, **_same_data_order(plan), "run.name": f"{plan.name}-best"}
    )
    header = (
        f"# Best trial {best['trial_id']} of sweep {plan.exp_dir}: {plan.metric} = "
        f"{best['best']:.4f} ({best['status']}, {best['epochs']} epochs).\n"
        f"# Params: {json.dumps(params)}\n"
        f"#   python -m jobs.finetune --config {join(out, 'best_config.yaml')}\n"
    )
    storage.write_text(join(out, "best_config.yaml"), header + C.to_yaml(best_cfg))
    for name, png in _plots(plan, rows).items():
        storage.write_bytes(join(out, name), png)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")}
    summary = {
        "exp_dir": plan.exp_dir,
        "metric": plan.metric,
        "mode": plan.mode,
        "trials": len(rows),
        "status": counts,
        "trial_epochs": int(sum(r["epochs"] for r in rows)),
        "best": {"trial_id": best["trial_id"], "value": best["best"], "params": params},
        "best_config": join(out, "best_config.yaml"),
    }
    storage.write_text(join(out, "summary.json"), json.dumps(summary, indent=1))
    log(
        f"[tune] {len(rows)} trials ({counts}), {summary['trial_epochs']} trial-epochs; best "
        f"{best['trial_id']}: {plan.metric}={best['best']:.4f} {params}"
    )
    return summary


def _plots(plan: SweepPlan, rows: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    out: dict[str, bytes] = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = json.loads(r["curve"])
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, alpha=0.8,
                label=f"{r['trial_id'][-5:]} ({r['status']})")  # fmt: skip
    ax.set_xlabel("validation round (epoch)")
    ax.set_ylabel(plan.metric)
    ax.set_title(f"{plan.name}: {plan.metric} per epoch, every trial")
    ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax.legend(fontsize=7, ncol=2)
    out["metric_vs_epoch.png"] = png(fig)
    study = _study(plan)
    if study is None:
        return out
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        ax = ovm.plot_optimization_history(study, target_name=plan.rank_metric)
        out["optimization_history.png"] = png(ax.figure)
    if len(done) >= 2 and any(len(t.params) for t in done):
        try:
            ax = ovm.plot_param_importances(study, target_name=plan.rank_metric)
            out["param_importances.png"] = png(ax.figure)
        except (RuntimeError, ValueError) as err:  # e.g. every trial got the same params
            print(f"[tune] parameter importances skipped: {err}")
    return out


def retrain_best(plan: SweepPlan, summary: dict[str, Any], log=print) -> dict[str, Any]:
    """Retrains the best config (a normal run, test split evaluated) and records it."""
    from raylens.train import finetune

    storage = Storage(plan.base.storage)
    text = storage.read_text(summary["best_config"])
    cfg = C.load(RunConfig, text)
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, budget_cpus=None))
    out = finetune(cfg)
    record = {
        "run_dir": out["run_dir"],
        "best_val": (out["best"] or {}).get("metrics"),
        "test": out["test"],
        "baseline": out.get("baseline"),
    }
    storage.write_text(
        join(plan.exp_dir, "results", "best_retrained.json"), json.dumps(record, indent=1)
    )
    log(f"[tune] best config retrained: {out['run_dir']}")
    return record


def cluster_resources() -> dict[str, float]:
    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
