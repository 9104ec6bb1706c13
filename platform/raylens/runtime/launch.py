"""Ray wiring: build a ``TorchTrainer`` on a budgeted cluster, and watch it run.

The budget (:mod:`raylens.runtime.resources`) guarantees Ray Data keeps CPUs while the
train workers run, so ingest can't starve (no deadlock on a 2-CPU machine).

:class:`Trainer` (what :func:`build_trainer` returns) adds to Ray's ``TorchTrainer``:

- on Ray 2.60, a placement-group cleaner that never takes a live run for dead and works
  beside another local Ray (:class:`SafePlacementGroupCleaner`);
- :class:`RunWatch`, a Train callback that records infrastructure failures and restarts
  with their cause in the run's ``metrics.jsonl`` (rows with an ``event`` key) and tells a
  :class:`RunLedger` which placement groups the run holds and when it last reported;
- a stall watchdog (``ray.stall_timeout_s``) that stops a run waiting for resources
  something else holds, with an error naming them, instead of hanging;
- the run's placement groups released when ``fit`` ends, however it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

# Ray Train 2.60 internals (Ray is pinned in pyproject.toml): the callback interfaces a
# Train run's controller calls (the cleaner's are in raylens.runtime.cleaner). A Ray
# upgrade that moves them fails here, at import, not silently in a run.
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.callback import (
    ControllerCallback,
    ReportCallback,
    WorkerGroupCallback,
)
from ray.train.v2._internal.execution.controller.state import (
    ErroredState,
    ReschedulingState,
    RestartingState,
)
from ray.util.placement_group import PlacementGroup, remove_placement_group

from raylens.runtime.cleaner import SafeCleanerCallback, SafePlacementGroupCleaner, first_line
from raylens.runtime.resources import (
    ResourcePlan,
    StallClock,
    format_resources,
    plan_resources,
    stall_message,
)
from raylens.schema import RayConfig, RunConfig

log = logging.getLogger("raylens")


def init_ray(cfg: RayConfig, *, dashboard: bool = False) -> None:
    """Joins ``ray.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``), else starts local Ray.

    ``dashboard``: a local Ray with its dashboard. Tune needs it: Ray Train's placement-group
    cleaner asks the dashboard's state API whether a trial's trainer is still alive, and
    without it the CPUs of every trial ASHA stops stay reserved (ray#54305) until the
    sweep hangs waiting for them.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": always a fresh local instance. A bare ray.init() would silently join a
        # cluster that `ray start` left running on this machine (and refuse num_cpus).
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=dashboard)


def budget(cfg: RayConfig) -> ResourcePlan:
    """The run's CPU plan over ``ray.budget_cpus`` (a Tune trial's share) or the cluster."""
    cpus = cfg.budget_cpus or float(ray.cluster_resources().get("CPU", 1.0))
    return plan_resources(cpus, cfg)


def build_trainer(
    train_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    cfg: RunConfig,
    *,
    run_config: RayRunConfig | None = None,
    split: list[str] | None = None,
) -> tuple[TorchTrainer, ResourcePlan]:
    """A :class:`Trainer` whose workers and Ray Data share the cluster without starving.

    Args:
        split: dataset names sharded across workers (default: all).
    """
    plan = budget(cfg.ray)
    resources = {**cfg.ray.worker_resources, "CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=plan.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
    )
    options = DataConfig.default_ingest_options()
    options.resource_limits = options.resource_limits.copy(cpu=plan.data_cpus)
    options.preserve_order = options.preserve_order or cfg.data.preserve_order
    data_config = DataConfig(datasets_to_split=split or "all", execution_options=options)
    trainer = Trainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        datasets=datasets,
        dataset_config=data_config,
        run_config=run_config,
    )
    log.info("resource plan: %s", plan.describe())
    return trainer, plan


# ----------------------------------------------------------------------------- the trainer

#: The Ray version whose placement-group cleaner :class:`Trainer` replaces (the pinned one).
#: On any other version Ray's own cleaner runs untouched, so an upgrade gets upstream's.
PATCHED_RAY = "2.60.0"
#: Which cleaner a Train run gets on :data:`PATCHED_RAY`: ``safe`` (the default,
#: :class:`SafePlacementGroupCleaner`), ``ray`` (Ray's own) or ``off`` (none: the placement
#: groups of a controller that dies are then freed by :meth:`Trainer.fit`'s release, a
#: sweep's release, or with the job). Read where ``fit`` is called.
CLEANER_ENV = "RAYLENS_PG_CLEANER"
CLEANERS = ("safe", "ray", "off")


class ResourceStallError(RuntimeError):
    """A run stopped by ``ray.stall_timeout_s``: no progress while resources stayed pending.
    Its message names what waited and which placement groups held the CPUs."""


@ray.remote(num_cpus=0)
class RunLedger:
    """What the driver knows of its Train runs (by run name): the controller, the placement
    groups its worker groups got, when it last reported, whether it ended.

    One per :meth:`Trainer.fit`, or one per sweep (each trial a run), owned by the driver:
    it outlives a Tune trial that is stopped, so the sweep can still release what the
    trial held. :class:`RunWatch` writes to it from the run's controller.
    """

    def __init__(self):
        self.runs: dict[str, dict] = {}

    def _run(self, run: str) -> dict:
        if run not in self.runs:
            self.runs[run] = {"controller": None, "groups": [], "reports": 0, "ended": False}
        return self.runs[run]

    def controller(self, run: str, handle) -> None:
        self._run(run)["controller"] = handle

    def add(self, run: str, group: PlacementGroup) -> None:
        self._run(run)["groups"].append(group)

    def progress(self, run: str) -> None:
        self._run(run)["reports"] += 1

    def end(self, run: str) -> None:
        """Marks ``run`` ended and drops its controller's handle (a handle held here would
        keep a finished controller alive)."""
        r = self._run(run)
        r["ended"], r["controller"] = True, None

    def status(self, run: str) -> dict:
        return dict(self._run(run))

    def owners(self) -> dict[str, tuple[str, bool]]:
        """Placement group id (hex) -> (run, ended), over every run."""
        return {g.id.hex(): (run, r["ended"]) for run, r in self.runs.items() for g in r["groups"]}


def start_ledger():
    """A new :class:`RunLedger` on this driver's node: it lives and dies with its driver, as
    Ray Train places a run's controller. Left to Ray's default it may land on any node and
    die with that node while the driver runs on (seen: a sweep that lost a worker node
    failed at its end, its ledger gone)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return RunLedger.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()


class RunWatch(ControllerCallback, WorkerGroupCallback, ReportCallback):
    """A Ray Train callback (it runs in the run's controller): tells ``ledger`` about the
    controller, each worker group's placement group and each report; records a restart
    (``FailureConfig``) or a final failure with its cause as an ``event`` row of the run's
    ``metrics.jsonl`` (:func:`record_event`). ``ledger``: a sweep's :class:`RunLedger`;
    None: :meth:`Trainer.fit` starts one for the run.
    """

    def __init__(self, cfg: RunConfig, ledger=None):
        self.cfg, self.ledger = cfg, ledger
        self.run = cfg.run.name
        self.restarts = 0

    def _tell(self, method: str, *args) -> None:
        if self.ledger is not None:
            getattr(self.ledger, method).remote(self.run, *args)

    def after_controller_start(self, train_run_context) -> None:
        self._tell("controller", ray.get_runtime_context().current_actor)

    def after_worker_group_start(self, worker_group) -> None:
        state = worker_group.get_worker_group_state()
        self._tell("add", state.placement_group_handle.placement_group)

    def after_report(self, training_report, metrics) -> None:
        self._tell("progress")

    def after_controller_state_update(self, previous_state, current_state) -> None:
        # a raise here would count as a controller failure: recording is best effort
        try:
            if isinstance(current_state, (RestartingState, ReschedulingState)):
                self.restarts += 1
                event = "restart"
            elif isinstance(current_state, ErroredState):
                event = "failed"
            else:
                return
            kind, cause = failure_cause(current_state.training_failed_error)
            limit = self.cfg.ray.max_failures
            record_event(
                self.cfg,
                event,
                kind=kind,
                cause=cause,
                restarts=self.restarts,
                max_failures=limit,
            )
        except Exception as err:
            log.warning("could not record a failure of run %r: %s", self.run, first_line(err))


def failure_cause(error: BaseException) -> tuple[str, str]:
    """``(kind, cause)`` of a Ray Train failure: one line, without ids, paths or tracebacks.

    kind: ``placement_group_removed``, ``node_lost``, ``worker_lost`` (its process died),
    ``worker_error`` (the training code raised), ``startup`` (the worker group could not
    start) or ``controller``.
    """
    failures = getattr(error, "worker_failures", None)
    if failures:
        found = [(rank, *_worker_failure(exc)) for rank, exc in sorted(failures.items())]
        order = ("placement_group_removed", "node_lost", "worker_lost", "worker_error")
        kind = min((k for _, k, _ in found), key=order.index)
        return kind, "; ".join(f"rank {rank}: {text}" for rank, _, text in found)
    inner = getattr(error, "controller_failure", None) or error
    name = type(inner).__name__
    if name.startswith("WorkerGroupStartup") or name == "InsufficientClusterResourcesError":
        return "startup", f"{name}: {first_line(inner)}"
    return "controller", f"{name}: {first_line(inner)}"


def _worker_failure(exc: BaseException) -> tuple[str, str]:
    text = str(exc)
    low = text.lower()
    if "placement group was removed" in low:
        return "placement_group_removed", "worker destroyed: its placement group was removed"
    if "node has died" in low or "nodedied" in low or type(exc).__name__ == "NodeDiedError":
        return "node_lost", "worker lost with its node"
    if "actor is unavailable" in low or "ActorUnavailable" in type(exc).__name__:
        # seen when a worker's node dies: its calls fail before Ray marks the node dead
        return "worker_lost", "worker unreachable (its process or its node stopped answering)"
    if "closed by peer" in low or "remote worker crashing" in low or "reset by peer" in low:
        # gloo/NCCL on a rank whose peer went: Ray's text is the C++ error (a build path)
        return "worker_lost", "collective call failed: a peer worker was lost"
    lost = ("actor died", "worker process has died", "health check", "actor is dead")
    if any(s in low for s in lost) or "ActorDied" in type(exc).__name__:
        detail = text.split("Worker exit detail:", 1)[1] if "Worker exit detail:" in text else ""
        detail = first_line(detail.split(". ")[0], 160) if detail.strip() else ""
        return "worker_lost", "worker process lost" + (f" ({detail})" if detail else "")
    # the training code raised: Ray's text is the worker's traceback, whose last line is
    # "ExceptionType: message"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return "worker_error", (lines[-1] if lines else type(exc).__name__)[:300]


def record_event(cfg: RunConfig, event: str, **fields) -> dict:
    """Appends an event row (``{"event": ..., "epoch", "step", **fields, "time"}``) to the
    run's ``metrics.jsonl``; ``epoch``/``step`` are those of the last report before it, so
    the row sorts where it happened. Returns the row.

    Storage retries are cut to 10 s: the caller may be Ray Train's controller, whose
    restart would wait on an object store that is down (an event is not worth that)."""
    import dataclasses

    from raylens.rundir import RunDir
    from raylens.storage import Storage

    quick = dataclasses.replace(cfg.storage, retry_seconds=min(cfg.storage.retry_seconds, 10.0))
    run = RunDir.of(cfg, Storage(quick))
    rows = run.history()
    last = next((r for r in reversed(rows) if "event" not in r), {})
    row = {
        "event": event,
        "epoch": last.get("epoch", 0),
        "step": last.get("step", 0),
        **fields,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run.write_history([*rows, row])
    return row


def with_events(rows: list[dict], events: list[dict]) -> list[dict]:
    """``rows`` (metric rows, by step) with ``events`` (event rows) placed after the last
    row of their step: a resumed worker's history from its checkpoint, plus the events the
    run dir recorded since (restarts happen between checkpoints)."""
    out = list(rows)
    for ev in events:
        if ev in out:
            continue
        i = len(out)
        while i > 0 and "event" not in out[i - 1] and out[i - 1].get("step", 0) > ev.get("step", 0):
            i -= 1
        out.insert(i, ev)
    return out


class Trainer(TorchTrainer):
    """Ray's ``TorchTrainer`` with raylens's run watch (see the module docstring).

    ``fit`` runs the run's :class:`RunWatch` (given in ``run_config.callbacks``; without
    one, ``fit`` is Ray's) with a :class:`RunLedger`, the stall watchdog over
    ``ray.stall_timeout_s``, and releases the run's placement groups when it ends.
    """

    #: the cleaner class a run launches on PATCHED_RAY (tests substitute one)
    cleaner: type = SafePlacementGroupCleaner

    @property
    def watch(self) -> RunWatch | None:
        return next((c for c in self.run_config.callbacks or [] if isinstance(c, RunWatch)), None)

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        mode = os.environ.get(CLEANER_ENV, "safe")
        if mode not in CLEANERS:
            raise ValueError(
                f"environment variable {CLEANER_ENV}={mode!r}: expected one of {CLEANERS}"
            )
        if ray.__version__ != PATCHED_RAY or mode == "ray":
            return callbacks
        swapped = []
        for c in callbacks:
            if type(c) is PlacementGroupCleanerCallback:
                if mode == "off":
                    continue
                c = SafeCleanerCallback(self.cleaner)
            swapped.append(c)
        return swapped

    def fit(self):
        watch = self.watch
        if watch is None:
            return super().fit()
        own = watch.ledger is None
        if own:
            watch.ledger = start_ledger()
        timeout = watch.cfg.ray.stall_timeout_s
        dog = Watchdog(watch, timeout) if timeout else None
        try:
            if dog:
                dog.start()
            return super().fit()
        except Exception:
            if dog and dog.error:
                raise ResourceStallError(dog.error) from None
            raise
        finally:
            if dog:
                dog.stop()
            release_run(watch.ledger, watch.run, running="skip", note=log.warning)
            if own:
                ray.kill(watch.ledger)
                watch.ledger = None


def release_run(
    ledger, run: str, *, running: str = "skip", note: Callable[[str], None] = print
) -> bool:
    """Ends ``run`` in ``ledger`` and removes every placement group it got that still holds
    resources (:func:`release_placement_groups`), logging through ``note``.

    ``running``: what to do while the run's controller still runs: ``"skip"`` (the caller
    is the run's own finished ``fit``: release now), ``"wait"`` (release nothing and return
    False, to be called again: a Tune trial's controller lives on for a moment after Tune
    stops the trial, and may still restart its workers in a new group) or ``"abort"`` (stop
    it with Ray's graceful abort first). Returns True once released. Never raises: an error
    is logged and returns False.
    """
    try:
        status = ray.get(ledger.status.remote(run), timeout=60)
        controller = status["controller"]
        if running != "skip" and controller is not None and _alive(controller):
            if running == "wait":
                return False
            with contextlib.suppress(Exception):  # it exits inside abort
                ray.get(controller.abort.remote(), timeout=60)
            note(f"run {run!r} was still running: aborted")
        ledger.end.remote(run)
        released = release_placement_groups(status["groups"])
    except Exception as err:  # never mask the run's own outcome
        note(f"run {run!r}: its placement groups were not released: {first_line(err)}")
        return False
    if released:
        note(
            f"run {run!r} ended holding {len(released)} placement group(s) (Ray Train's "
            f"cleaner had not removed them): released {', '.join(released)}"
        )
    return True


def _alive(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return False
    except ray.exceptions.GetTimeoutError:  # busy, not dead
        return True
    return True


class Watchdog(threading.Thread):
    """Stops a run that made no progress (no report) for ``timeout_s`` seconds while
    resources stayed pending (:class:`~raylens.runtime.resources.StallClock`): records a
    ``stalled`` event, aborts the run's controller (its workers and placement group go) and
    leaves the error in :attr:`error` for :meth:`Trainer.fit` to raise."""

    def __init__(self, watch: RunWatch, timeout_s: float):
        super().__init__(name=f"raylens-watchdog-{watch.run}", daemon=True)
        self.watch, self.timeout_s = watch, timeout_s
        self.poll_s = max(1.0, min(10.0, timeout_s / 10))
        self.error: str | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        clock = StallClock(self.timeout_s)
        ledger = self.watch.ledger
        while not self._stop_event.wait(self.poll_s):
            try:
                status = ray.get(ledger.status.remote(self.watch.run), timeout=30)
                pending = pending_demand()
            except Exception as err:  # unknown this time: no evidence of a stall
                log.debug("watchdog: %s", first_line(err))
                continue
            now = time.monotonic()
            if not clock.update(now, pending=bool(pending), reports=status["reports"]):
                continue
            self.error = stall_message(
                self.watch.run,
                timeout_s=self.timeout_s,
                stalled_s=clock.stalled_for(now),
                pending=describe_pending(pending),
                holders=describe_holders(ledger, self.watch.run),
                free=ray.available_resources(),
                total=ray.cluster_resources(),
            )
            log.error("%s", self.error)
            try:
                record_event(self.watch.cfg, "stalled", kind="stall", cause=self.error)
            except Exception as err:
                log.warning("could not record the stall: %s", first_line(err))
            if status["controller"] is not None:
                # Ray's graceful abort (its Ctrl-C): workers stop, the placement group goes;
                # the controller exits inside it, so the call itself ends in an error
                with contextlib.suppress(Exception):
                    ray.get(status["controller"].abort.remote(), timeout=60)
            return


def pending_demand() -> list[tuple[str, dict[str, float], int]]:
    """Resource demand waiting in the cluster now: ``(what, resources, count)`` for tasks
    and actors (``"task"``) and placement groups (``"placement group <id>"``), as Ray's
    autoscaler sees it (the GCS: no dashboard needed, unlike the state API)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    out = []
    for demand in status.resource_demands.ray_task_actor_demand:
        for b in demand.bundles_by_count:
            out.append(("task", dict(b.bundle), int(b.count)))
    for demand in status.resource_demands.placement_group_demand:
        for b in demand.bundles_by_count:
            out.append(
                (f"placement group {(demand.pg_id or '?')[:8]}", dict(b.bundle), int(b.count))
            )
    return out


def describe_pending(pending: list[tuple[str, dict[str, float], int]]) -> list[str]:
    """One line per waiting demand; tasks and actors are named when the state API (the
    dashboard) answers, by their shape otherwise."""
    names = _pending_names()
    lines = []
    for what, resources, count in pending:
        if what == "task":
            shown = f" ({names})" if names else ""
            lines.append(
                f"{count} task(s)/actor(s) wanting {format_resources(resources)} each{shown}"
            )
        else:
            lines.append(f"{what} wanting {count} x {format_resources(resources)}")
    return lines


def _pending_names() -> str:
    try:
        from ray.util.state import list_actors, list_tasks

        address = ray.get_runtime_context().gcs_address
        tasks = list_tasks(
            address=address, filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=5
        )
        actors = list_actors(
            address=address, filters=[("state", "=", "PENDING_CREATION")], timeout=5
        )
    except Exception:  # no dashboard, or it does not answer: shapes only
        return ""
    counts: dict[str, int] = {}
    for name in [t.name for t in tasks] + [a.class_name for a in actors]:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(counts.items()))


def describe_holders(ledger, run: str) -> list[str]:
    """The placement groups holding CPUs or GPUs now, named by their run when ``ledger``
    knows it (``this run``, ``run 't_0001', ended``)."""
    try:
        owners = ray.get(ledger.owners.remote(), timeout=30)
    except Exception:
        owners = {}
    lines = []
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] in ("REMOVED", "PENDING"):
            continue
        held: dict[str, float] = {}
        for bundle in info["bundles"].values():
            for k, v in bundle.items():
                if k in ("CPU", "GPU"):
                    held[k] = held.get(k, 0.0) + float(v)
        if not held:
            continue
        owner, ended = owners.get(pg_id, (None, False))
        label = (
            "this run"
            if owner == run
            else f"run {owner!r}{', ended' if ended else ''}"
            if owner
            else "not a run of this driver"
        )
        lines.append(f"{pg_id[:8]} ({label}): {format_resources(held)}")
    return lines


def release_placement_groups(groups: list[PlacementGroup]) -> list[str]:
    """Removes those of ``groups`` that still hold resources (not REMOVED); returns one
    line per group removed (id and resources)."""
    table = ray.util.placement_group_table()
    out = []
    for group in groups:
        info = table.get(group.id.hex())
        if not info or info["state"] == "REMOVED":
            continue
        remove_placement_group(group)
        held: dict[str, float] = {}
        for bundle in info["bundles"].values():
            for k, v in bundle.items():
                held[k] = held.get(k, 0.0) + float(v)
        out.append(f"{group.id.hex()[:8]} ({info['state']}, {format_resources(held)})")
    return out


# ----------------------------------------------------------------------------- Train workers


def ray_run_config(cfg: RunConfig, storage, callbacks: list | None = None) -> RayRunConfig:
    """Ray Train's run state in the run dir (so re-running resumes), with the restart budget
    and checkpoint retention (:class:`BestAndLast`). ``callbacks``: Ray Train callbacks (a
    Tune trial passes ``TuneReportCallback`` and its sweep's :class:`RunWatch`); a
    :class:`RunWatch` of the run's own is added when none is given."""
    from raylens.storage import split_uri

    callbacks = list(callbacks or [])
    if not any(isinstance(c, RunWatch) for c in callbacks):
        callbacks.append(RunWatch(cfg))
    scheme, path = split_uri(cfg.run.output_dir)
    return RayRunConfig(
        name=cfg.run.name,
        storage_path=path,
        storage_filesystem=storage.arrow_fs(scheme),
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        # no score attribute: Ray keeps the last N reported (always the latest, which a
        # restart resumes from); the best is kept by BestAndLast
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        callbacks=callbacks,
    )


class BestAndLast:
    """Rank 0's half of ``train.keep_checkpoints = N``: the run keeps its best checkpoint and
    its last N, nothing else.

    Ray Train's ``CheckpointConfig(num_to_keep, checkpoint_score_attribute)`` keeps the top N
    by a score fixed when a checkpoint is reported, plus the latest (or, without a score,
    the last N): it cannot express "the best and the last N" for N > 1, since a
    checkpoint's claim to be kept ends when a better one arrives. Deleting checkpoints
    behind Ray's back is no way out either: a restart then fails on Ray's snapshot naming a
    checkpoint that is gone. So Ray keeps the last N (:func:`ray_run_config`), and just
    before the best would leave that window (the report that pushes it out, before Ray sees
    it) it is copied to ``checkpoints/best`` (:data:`raylens.rundir.BEST_CHECKPOINT`) and
    ``best.json`` names the copy; a later best makes the copy redundant and it is deleted.
    A best is copied at most once, when it ages out. ``keep=None`` keeps everything.

    Args:
        reported: the checkpoint names reported so far, oldest first (from the resumed
            history), in the order Ray registered them.
    """

    def __init__(self, run, keep: int | None, reported: list[str]):
        self.run, self.keep, self.reported = run, keep, list(reported)
        best = run.best()
        self.best: str | None = best["checkpoint"] if best else None

    def before_report(self, name: str, improved: bool) -> None:
        """Call before reporting checkpoint ``name`` to Ray."""
        from raylens.checkpoint import copy_checkpoint
        from raylens.rundir import BEST_CHECKPOINT

        self.reported.append(name)
        if self.keep is None or improved or self.best in (None, BEST_CHECKPOINT):
            return
        if self.best in self.reported[-self.keep :]:
            return
        copy_checkpoint(self.run.storage, self.run.path(self.best), self.run.path(BEST_CHECKPOINT))
        best = self.run.best()
        self.run.write_best(
            {**best["metrics"], "epoch": best["epoch"], "checkpoint": BEST_CHECKPOINT}
        )
        self.best = BEST_CHECKPOINT

    def after_best(self, name: str) -> None:
        """Call once ``best.json`` names the new best checkpoint ``name``."""
        from raylens.rundir import BEST_CHECKPOINT

        old, self.best = self.best, name
        if old == BEST_CHECKPOINT and name != BEST_CHECKPOINT:
            self.run.storage.delete_tree(self.run.path(BEST_CHECKPOINT))


def sync_batchnorm(model, cfg: RunConfig, device, world: int, log: Callable[[str], None]):
    """``model`` with SyncBatchNorm (``train.sync_bn``) when it trains on several GPU workers
    and has BatchNorm layers; call before ``prepare_model``.

    On CPU workers it is skipped, saying so through ``log``: torch's SyncBatchNorm
    synchronizes only GPU (CUDA, XPU, HPU) tensors and raises on CPU ones at the first
    training step under DDP, so each CPU worker keeps its own batch statistics.
    """
    import torch

    if not cfg.train.sync_bn or world < 2:
        return model
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        log(
            f"[train] train.sync_bn skipped on {device.type} workers: torch's SyncBatchNorm "
            "syncs GPU tensors only; each worker normalizes with its own batch statistics"
        )
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def say(message: str) -> None:
    """One progress line on the worker's stdout (shown once by the driver). Not ``print``:
    Ray Train patches it into a logger whose output reached the driver twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def fit_on_worker(
    cfg: RunConfig,
    model,
    task,
    *,
    train_batches,
    val_batches,
    steps_per_epoch: int,
    device,
    channels_last: bool,
    mixer=None,
) -> None:
    """:func:`raylens.loop.fit` on a Ray Train worker, for every training pipeline: resumes
    from Ray Train's checkpoint, reports metrics and checkpoints through
    :func:`make_reporter`, sums metrics over workers. ``mixer``: Mixup/CutMix (see ``fit``)."""
    import torch
    import torch.distributed as dist

    from raylens.checkpoint import load_checkpoint
    from raylens.loop import Hooks, fit
    from raylens.storage import Storage

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            resume = load_checkpoint(Storage(), path)
    report, events = make_reporter(cfg, Storage(cfg.storage), rank, resume)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    fit(
        model,
        task,
        cfg.train,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=steps_per_epoch,
        device=device,
        hooks=Hooks(
            all_reduce=all_reduce,
            report=report,
            is_main=rank == 0,
            log=say if rank == 0 else (lambda m: None),
        ),
        resume=resume,
        channels_last=channels_last,
        mixer=mixer,
    )
    if events is not None:
        events.close()


def make_reporter(cfg: RunConfig, storage, rank: int, resume: dict | None):
    """The loop's ``report`` hook on a Train worker, and rank 0's TensorBoard log.

    ``report(metrics, checkpoint)`` reports to Ray Train (with the checkpoint), then rank 0
    records the run dir's history and best checkpoint: they never name a checkpoint not
    persisted first. Rank 0 keeps the best and the last ``train.keep_checkpoints``
    (:class:`BestAndLast`).
    """
    import tempfile

    from raylens.checkpoint import save_checkpoint
    from raylens.rundir import RunDir
    from raylens.runtime.events import EventLog
    from raylens.storage import Storage

    run = RunDir.of(cfg, storage)
    history: list[dict] = list((resume or {}).get("extra", {}).get("history", []))
    if rank == 0:  # the events the run dir recorded (restarts...) stay in order, also when
        # a restart starts over: a worker group lost before Ray Train registered any
        # checkpoint (a node gone right after the first report) resumes from none
        history = with_events(history, [row for row in run.history() if "event" in row])
    events = EventLog(storage, run.tensorboard) if rank == 0 else None
    keeper = None
    if rank == 0:
        reported = [row["checkpoint"] for row in history if row.get("checkpoint")]
        keeper = BestAndLast(run, cfg.train.keep_checkpoints, reported)

    def report(metrics: dict, ck: dict | None) -> None:
        if ck is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    keeper.before_report(ck["name"], bool(metrics.get("best")))
                    save_checkpoint(
                        Storage(),
                        tmp,
                        model=ck["model"],
                        optimizer=ck["optimizer"],
                        scheduler=ck["scheduler"],
                        extra=ck["extra"],
                        train_model=ck.get("train_model"),
                    )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                    checkpoint_dir_name=ck["name"],
                )
        if rank != 0:
            return
        history.append(metrics)
        events.add(metrics)
        run.write_history(history)
        if metrics.get("best"):
            run.write_best(metrics)
            keeper.after_best(metrics["checkpoint"])

    return report, events


def ingest_check_loop(config: dict) -> None:
    """Train-worker function that consumes its shard and reports counts and throughput.

    Used to check an ingest pipeline end to end on the real workers (tests, benchmarks,
    ``jobs`` dry runs). ``config``: ``{"data": DataConfig, "dataset": name, "out": uri,
    "storage": Storage}``; each rank writes ``<out>/rank-<r>.json`` (Train V2 keeps no
    metrics reported without a checkpoint).
    """
    import json

    import torch

    from raylens.runtime.ingest import TorchCollate

    data = config["data"]
    shard = ray.train.get_dataset_shard(config.get("dataset", "train"))
    rows, batches, checksum = 0, 0, 0.0
    t0 = time.perf_counter()
    for batch in shard.iter_torch_batches(
        batch_size=data.batch_size,
        collate_fn=TorchCollate(data),
        prefetch_batches=data.prefetch_batches,
    ):
        image = batch["image"]
        assert image.dtype == torch.float32 and image.ndim == 4
        rows += image.shape[0]
        batches += 1
        checksum += float(image.mean())
    seconds = time.perf_counter() - t0
    rank = ray.train.get_context().get_world_rank()
    metrics = {
        "rows": rows,
        "batches": batches,
        "seconds": seconds,
        "rank": rank,
        "mean_pixel": checksum / max(batches, 1),
    }
    if config.get("out"):
        from raylens.storage import join

        config["storage"].write_text(join(config["out"], f"rank-{rank}.json"), json.dumps(metrics))
    ray.train.report(metrics)
