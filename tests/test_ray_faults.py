"""Ray infrastructure faults: Ray Train's placement-group cleaner taking a live run for dead
(a state-API miss) or giving up beside another local Ray, restarts recorded with their
cause, runs that wait for CPUs something else holds, and sweeps whose stopped trials keep
their placement groups.

Unit tests first (no Ray); then the Ray ones, each bounded and marked ``ray``/``faults``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from raylens import config as C
from raylens.config import ConfigError
from raylens.runtime.resources import StallClock, format_resources, stall_message
from raylens.schema import RunConfig
from raylens.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- unit


def test_a_stall_needs_pending_resources_and_no_report_for_the_whole_timeout():
    clock = StallClock(60)
    assert not clock.update(0, pending=True, reports=0)
    assert not clock.update(59, pending=True, reports=0)
    assert clock.update(60, pending=True, reports=0) and clock.stalled_for(61) == 61
    # a report restarts the count; so does a moment with nothing pending
    clock = StallClock(60)
    for t, pending, reports in [(0, True, 0), (50, True, 1), (100, True, 1), (105, False, 1)]:
        assert not clock.update(t, pending=pending, reports=reports), t
    assert not clock.update(110, pending=True, reports=1)
    assert not clock.update(169, pending=True, reports=1)
    assert clock.update(170, pending=True, reports=1)
    # a long epoch (no report) with nothing pending never stalls
    clock = StallClock(10)
    assert not any(clock.update(t, pending=False, reports=0) for t in range(0, 1000, 5))


def test_the_stall_error_names_what_waits_what_holds_and_what_is_free():
    msg = stall_message(
        "t_0003",
        timeout_s=60,
        stalled_s=64.2,
        pending=["1 task(s)/actor(s) wanting 1 CPU each (MapBatches(_DecodeBatch))"],
        holders=["3f2a9c01 (run 't_0001', ended): 1 CPU", "77aa0b12 (this run): 1 CPU"],
        free={"CPU": 0.0},
        total={"CPU": 2.0},
    )
    assert msg.startswith("run 't_0003' made no progress for 64 s")
    for part in ("ray.stall_timeout_s=60", "MapBatches(_DecodeBatch)", "run 't_0001', ended",
                 "CPU 0 of 2 free", "ray.util.remove_placement_group"):  # fmt: skip
        assert part in msg, part
    assert "\n" not in msg and "GPU" not in msg
    assert format_resources({"CPU": 1.0, "memory": 5e8, "node:__internal_head__": 0.001}) == "1 CPU"
    assert format_resources(
        {"CPU_group_0_3d262102f269": 1.0, "bundle_group_3d26": 1e3, "GPU": 1}
    ) == ("1 CPU of placement group 3d262102 + 1 GPU")


def test_stall_timeout_is_validated():
    assert C.load(RunConfig, None, []).ray.stall_timeout_s == 600
    assert C.load(RunConfig, None, ["ray.stall_timeout_s=null"]).ray.stall_timeout_s is None
    with pytest.raises(ConfigError, match="'ray.stall_timeout_s': expected seconds > 0"):
        C.load(RunConfig, None, ["ray.stall_timeout_s=0"])


class _WorkerGroupError(Exception):  # the shape of ray.train.WorkerGroupError
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


class ActorDiedError(Exception):
    pass


def test_failure_causes_are_one_line_without_ids_or_tracebacks():
    from raylens.runtime.launch import failure_cause

    removed = ActorDiedError(
        "A worker health check failed.\nWorker info: Worker(actor=Actor(RayTrainWorker, 4e02))\n"
        "The actor is dead because its worker process has died. Worker exit type: "
        "INTENDED_SYSTEM_EXIT Worker exit detail: Destroying worker since its placement group "
        "was removed. Placement group id: 18af07a0, bundle index: 0"
    )
    assert failure_cause(_WorkerGroupError({0: removed})) == (
        "placement_group_removed",
        "rank 0: worker destroyed: its placement group was removed",
    )
    killed = ActorDiedError(
        "The actor died unexpectedly before finishing this task.\n\tpid: 9320\nThe actor is "
        "dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
        "detail: Worker unexpectedly exits with a connection error code 2. End of file."
    )
    user = RuntimeError(
        'Traceback (most recent call last):\n  File "/work/x.py", line 3, in f\n'
        "ValueError: the labels do not match"
    )
    kind, cause = failure_cause(_WorkerGroupError({0: user, 1: killed}))
    assert kind == "worker_lost"  # an infrastructure cause ranks before the code's error
    assert cause == (
        "rank 0: ValueError: the labels do not match; rank 1: worker process lost (Worker "
        "unexpectedly exits with a connection error code 2)"
    )
    node = ActorDiedError("The actor died because its node has died. Node Id: ab12")
    assert failure_cause(_WorkerGroupError({0: node}))[0] == "node_lost"

    class WorkerGroupStartupTimeoutError(Exception):
        pass

    class ControllerError(Exception):
        def __init__(self, inner):
            super().__init__(str(inner))
            self.controller_failure = inner

    startup = ControllerError(WorkerGroupStartupTimeoutError("start timed out after 30 s\nx"))
    assert failure_cause(startup) == (
        "startup",
        "WorkerGroupStartupTimeoutError: start timed out after 30 s",
    )


def test_a_resumed_history_keeps_the_events_recorded_since_its_checkpoint():
    from raylens.runtime.launch import with_events

    rows = [{"epoch": 1, "step": 5}, {"epoch": 2, "step": 10}]
    old = {"event": "restart", "epoch": 1, "step": 5, "cause": "a"}
    new = {"event": "restart", "epoch": 2, "step": 10, "cause": "b"}
    later = {"event": "restart", "epoch": 3, "step": 15, "cause": "c"}
    assert with_events(rows, [old, new, later]) == [rows[0], old, rows[1], new, later]
    assert with_events([*rows, new], [new]) == [*rows, new]  # never twice


def test_the_safe_cleaner_acts_only_on_a_dead_record():
    from raylens.runtime.cleaner import SafePlacementGroupCleaner

    cleaner = SafePlacementGroupCleaner.__new__(SafePlacementGroupCleaner)  # no actor
    cleaner._warned_at = None
    answers = {"a": "ALIVE", "d": "DEAD", "m": None}

    def state(actor_id, timeout):
        if actor_id == "x":
            raise ConnectionError("Found multiple active Ray instances")
        return answers[actor_id]

    cleaner.actor_state = state
    assert cleaner.controller_alive("a", 5) and not cleaner.controller_alive("d", 5)
    assert cleaner.controller_alive("m", 5)  # no record: unknown, alive
    assert cleaner.controller_alive("x", 5)  # no answer: unknown, alive


# ----------------------------------------------------------------------------- Ray

_SLEEP_PER_BATCH = 0.25


def tiny_worker(config: dict) -> None:
    """A Train worker running the real loop (fit_on_worker: reports, checkpoints, resume)
    on a linear model over fixed random batches, slowed so that an epoch takes ~1 s;
    each worker process appends its pid to ``config["pids"]`` when it starts."""
    import torch
    from raylens.runtime import launch
    from raylens.tasks import create_task

    cfg = config["cfg"]
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "image": torch.randn(8, 3, 8, 8, generator=g),
            "label": torch.randint(0, 2, (8,), generator=g),
        }
        for _ in range(4)
    ]

    def slow(batches):
        for b in batches:
            time.sleep(_SLEEP_PER_BATCH)
            yield b

    if config.get("pids"):  # one line per worker process the run started
        with open(config["pids"], "a") as f:
            f.write(f"{os.getpid()}\n")
    launch.fit_on_worker(
        cfg,
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)),
        create_task(cfg, 2),
        train_batches=lambda epoch: slow(data),
        val_batches=lambda: iter(data[:1]),
        steps_per_epoch=4,
        device=torch.device("cpu"),
        channels_last=False,
    )


def _tiny_cfg(tmp_path, name, *extra):
    return C.load(
        RunConfig,
        None,
        [
            f"run.name={name}",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.warmup_epochs=0",
            "train.lr=0.01",
            "ray.num_workers=1",
            *extra,
        ],
    )


def _rows(tmp_path, name) -> list[dict]:
    text = (tmp_path / "runs" / name / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _missing_records_after(base: type, flag: str) -> type:
    """``base`` (a cleaner class) whose state API loses every record once ``flag`` exists:
    ``get_actor`` answers None, as the dashboard did under load. Patched where both Ray's
    check and the safe one look it up, in the cleaner actor's own process."""

    class MissingRecords(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            import ray.util.state as api
            from ray.train.v2._internal.state import util

            real = api.get_actor

            def get_actor(*a, **kw):
                if os.path.exists(flag):
                    return None
                return real(*a, **kw)

            api.get_actor = util.get_actor = get_actor

    return MissingRecords


def _created_groups() -> list[str]:
    import ray

    return [k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"]


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(420)
def test_a_state_api_miss_neither_ends_nor_disturbs_the_run(ray_session, tmp_path, monkeypatch):
    """The state API loses the controller's record after epoch 2 of 4. Ray 2.60's check
    takes that for a death: its cleaner removes the live run's placement group, the worker
    dies, and only ray.max_failures=1 lets the run go on (``make demo``'s epoch 9). The safe
    cleaner (what raylens runs) keeps the run and its one worker. Either way the restart,
    if any, is in metrics.jsonl with its cause."""
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
        PlacementGroupCleaner,
    )
    from raylens.runtime.cleaner import SafePlacementGroupCleaner
    from raylens.runtime.launch import Trainer, build_trainer, ray_run_config

    before = set(_created_groups())
    outcome = {}
    for name, base in (("ray-check", PlacementGroupCleaner), ("safe", SafePlacementGroupCleaner)):
        flag = tmp_path / f"{name}.miss"
        pids = tmp_path / f"{name}.pids"
        monkeypatch.setattr(Trainer, "cleaner", _missing_records_after(base, str(flag)))
        cfg = _tiny_cfg(tmp_path, name, "train.epochs=4", "ray.max_failures=1")
        metrics = tmp_path / "runs" / name / "metrics.jsonl"

        def miss_after_two_epochs(flag=flag, metrics=metrics):
            deadline = time.time() + 300
            while time.time() < deadline:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                    flag.write_text("")
                    return
                time.sleep(0.1)

        thread = threading.Thread(target=miss_after_two_epochs, daemon=True)
        thread.start()
        trainer, _ = build_trainer(
            tiny_worker, {"cfg": cfg, "pids": str(pids)}, {}, cfg,
            run_config=ray_run_config(cfg, Storage()),
        )  # fmt: skip
        t0 = time.time()
        trainer.fit()
        thread.join(timeout=5)
        outcome[name] = {
            "rows": _rows(tmp_path, name),
            "pids": pids.read_text().split(),
            "missed_s": time.time() - flag.stat().st_mtime,
            "fit_s": time.time() - t0,
        }
        print(name, {k: v for k, v in outcome[name].items() if k != "rows"})

    ray_rows = outcome["ray-check"]["rows"]
    events = [r for r in ray_rows if "event" in r]
    assert [r["epoch"] for r in ray_rows if "event" not in r] == [1, 2, 3, 4], ray_rows
    assert len(events) == 1 and events[0]["event"] == "restart", ray_rows
    assert events[0]["kind"] == "placement_group_removed", events
    assert "placement group was removed" in events[0]["cause"]
    # the event names the last epoch reported before the loss; the run resumed from the
    # last checkpoint its controller had registered (epoch 2's, or epoch 1's when the loss
    # came first), and the event sits right before the first resumed row
    assert events[0]["epoch"] == 2 and events[0]["restarts"] == 1, events
    at = ray_rows.index(events[0])
    resumes = [r.get("resumes") for r in ray_rows]
    assert resumes[:at] == [0] * at and resumes[at + 1 :] == [1] * (len(ray_rows) - at - 1)
    assert at in (1, 2), ray_rows
    assert len(set(outcome["ray-check"]["pids"])) == 2  # the worker was lost and replaced

    safe = outcome["safe"]
    assert [r["epoch"] for r in safe["rows"]] == [1, 2, 3, 4], safe["rows"]
    assert not any("event" in r for r in safe["rows"]) and {r["resumes"] for r in safe["rows"]} == {
        0
    }
    assert len(set(safe["pids"])) == 1  # one worker throughout
    assert safe["missed_s"] >= 2.0  # the record was missing for >= 2 cleaner checks (1 s)
    assert set(_created_groups()) <= before  # nothing left holding CPUs


def waits_for_a_cpu(config: dict) -> None:
    """A Train worker whose pipeline needs one more CPU (as a Ray Data decode task does)."""
    import ray

    @ray.remote(num_cpus=1)
    def decode():
        return 1

    ray.get(decode.remote())


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_run_waiting_for_cpus_a_leftover_group_holds_stops_with_an_error_naming_it(
    ray_session, tmp_path
):
    """A placement group left over (as a stopped trial's was) holds 1 of the 2 CPUs; the
    run's worker takes the other, and its pipeline waits for a CPU for ever. With
    ray.stall_timeout_s=15 the run stops with an error naming the waiting task, the
    leftover group and the free CPUs, records a ``stalled`` event, and leaves nothing held."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from raylens.runtime.launch import ResourceStallError, build_trainer, ray_run_config

    leftover = placement_group([{"CPU": 1}])
    ray.get(leftover.ready(), timeout=60)
    try:
        cfg = _tiny_cfg(tmp_path, "stall", "ray.stall_timeout_s=15", "ray.max_failures=0")
        trainer, plan = build_trainer(
            waits_for_a_cpu, {}, {}, cfg, run_config=ray_run_config(cfg, Storage())
        )
        assert plan.cpus_per_worker == 1 and plan.data_cpus == 1
        t0 = time.time()
        with pytest.raises(ResourceStallError) as err:
            trainer.fit()
        took = time.time() - t0
        msg = str(err.value)
        print(f"stall error after {took:.1f} s: {msg}")
        assert 15 <= took <= 120, took
        assert msg.startswith("run 'stall' made no progress for ")
        assert "1 task(s)/actor(s) wanting 1 CPU each" in msg
        assert f"{leftover.id.hex()[:8]} (not a run of this driver): 1 CPU" in msg
        assert "(this run): 1 CPU" in msg and "CPU 0 of 2 free" in msg
        assert "\n" not in msg and "Traceback" not in msg
        rows = _rows(tmp_path, "stall")
        assert rows[-1]["event"] == "stalled" and rows[-1]["cause"] == msg
        deadline = time.time() + 30  # the run's own group is gone, the leftover remains
        while time.time() < deadline and set(_created_groups()) != {leftover.id.hex()}:
            time.sleep(0.5)
        assert set(_created_groups()) == {leftover.id.hex()}
    finally:
        remove_placement_group(leftover)


SECOND_RAY = (
    "import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False, "
    "log_to_driver=False); print('up', flush=True); time.sleep(1800)"
)


def _second_ray() -> subprocess.Popen:
    """Another local Ray on the machine (as ``serve run`` beside a training job)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_RAY], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "up"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGKILL)  # the process and the Ray it started
    proc.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(420)
def test_the_safe_cleaner_works_beside_another_local_ray(no_ray_here):
    """With a second local Ray on the machine, Ray 2.60's cleaner cannot tell which cluster
    to ask (its monitor thread dies on "Found multiple active Ray instances", or it asks
    the other cluster, finds no record and removes a live group): either way it does not
    keep a live run's placement group and free a dead one's. The safe cleaner asks its own
    cluster: it keeps the group while the controller lives and removes it once it died."""
    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
        PlacementGroupCleaner,
    )
    from ray.util.placement_group import placement_group
    from raylens.runtime.cleaner import SafePlacementGroupCleaner

    other = _second_ray()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)

        @ray.remote(num_cpus=0)
        class Controller:  # stands in for a Train run's controller
            def actor_id(self) -> str:
                return ray.get_runtime_context().get_actor_id()

        seen = {}
        for name, cls in (("ray", PlacementGroupCleaner), ("safe", SafePlacementGroupCleaner)):
            controller = Controller.remote()
            group = placement_group([{"CPU": 0.5}])
            ray.get(group.ready(), timeout=60)
            cleaner = (
                ray.remote(num_cpus=0)(cls)
                .options(lifetime="detached")
                .remote(
                    controller_actor_id=ray.get(controller.actor_id.remote()),
                    check_interval_s=0.5,
                    get_actor_timeout_s=5,
                    stop_timeout=5,
                )
            )
            ray.get(cleaner.register_placement_group.remote(group))
            cleaner.start_monitoring.remote()

            def state(group=group):
                return ray.util.placement_group_table(group)["state"]

            time.sleep(5)  # ~10 checks while the controller lives
            kept_while_alive = state() == "CREATED"
            ray.kill(controller)
            t0 = time.time()
            while time.time() - t0 < 30 and state() != "REMOVED":
                time.sleep(0.25)
            seen[name] = {
                "kept_while_alive": kept_while_alive,
                "removed_after_death": state() == "REMOVED",
                "seconds": round(time.time() - t0, 1),
            }
            print(name, seen[name])
            ray.kill(cleaner)
            if state() != "REMOVED":
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(group)
        assert seen["safe"]["kept_while_alive"] and seen["safe"]["removed_after_death"], seen
        assert seen["safe"]["seconds"] < 15, seen
        stock = seen["ray"]
        assert not (stock["kept_while_alive"] and stock["removed_after_death"]), seen
    finally:
        ray.shutdown()
        _stop(other)


SWEEP_SPACE = (
    "space:\n"
    "  train.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-2}\n"
    "fixed:\n"
    "  train.warmup_epochs: 0.0\n"
)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(1200)
def test_a_sweep_releases_stopped_trials_groups_without_rays_cleaner(no_ray_here, tmp_path):
    """jobs.tune, 4 trials on 2 CPUs (one trial at a time: its worker + Ray Data), ASHA
    stopping weak trials, Ray Train's placement-group cleaner turned off and a second
    local Ray on the machine. A stopped trial's group that nobody removed would hold a CPU
    and the next trial's decode tasks would wait for ever (the sweep that hung after 2
    trials); ray.stall_timeout_s=90 turns such a wait into a trial error. Every trial must
    end without error, nothing may stay held, and the sweep must finish."""
    from tests.sourcegen import prepare_quiet, write_folder

    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=24)
    prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    (tmp_path / "base.yaml").write_text(
        f"run: {{name: rel, output_dir: {tmp_path / 'runs'}, seed: 0}}\n"
        f"data: {{dataset: {tmp_path / 'ds'}, image_size: 16, batch_size: 16, "
        "eval_crop_pct: 1.0}\n"
        "model: {backbone: vgg_s8}\n"
        "train: {epochs: 3, lr: 0.003}\n"
        "ray: {local_num_cpus: 2, stall_timeout_s: 90}\n"
        "tune: {num_samples: 4, n_startup_trials: 4, seed: 3, reduction_factor: 4, "
        "retrain: false}\n"
    )
    (tmp_path / "space.yaml").write_text(SWEEP_SPACE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAYLENS_PG_CLEANER": "off"}
    other = _second_ray()
    try:
        t0 = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "jobs.tune", "--config", str(tmp_path / "base.yaml"),
             "--space", str(tmp_path / "space.yaml")],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=1000,
        )  # fmt: skip
        took = time.time() - t0
    finally:
        _stop(other)
    log = out.stdout + out.stderr
    (tmp_path / "sweep.log").write_text(log)
    assert out.returncode == 0, log[-4000:]
    summary = json.loads((tmp_path / "runs" / "rel-tune" / "results" / "summary.json").read_text())
    print(f"sweep {took:.0f} s: {summary['status']}")
    print("\n".join(x for x in log.splitlines() if "[tune]" in x))
    assert summary["trials"] == 4 and summary["status"]["error"] == 0, summary
    # the scenario happened: ASHA stopped trials mid-run, their controllers died with them
    # and (no cleaner) their groups stayed: released here, each one
    stopped = summary["status"]["stopped"]
    assert stopped >= 1, summary
    assert log.count("(Ray Train's cleaner had not removed them): released") >= stopped, log[-3000:]
    assert "[tune] trials' placement groups still holding resources: none" in log
    assert "Found multiple active Ray instances" not in log
