"""One writer per output: the lease (raylens.lease) on local paths, S3 and GCS; two jobs
racing for it; a holder that died; and the jobs that take it (prepare, finetune)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from raylens import cli
from raylens.lease import LEASE, Lease, LeaseHeld, hold
from raylens.storage import Storage, StorageError, join

from tests.repo import REPO, run_job
from tests.sourcegen import prepare_quiet, write_folder

HOST = re.escape(socket.gethostname())
OUT = "runs/exp#2 ?x=1"  # a hostile key: the lease object's name keeps every character


def _lease(storage, out, *, job="jobs.finetune", ttl_s=60.0, log=None) -> Lease:
    return Lease(
        join(out, LEASE),
        storage,
        job=job,
        what=f"run dir {out!r}",
        key="run.name",
        run="exp",
        ttl_s=ttl_s,
        log=log or (lambda m: None),
    )


def _holder(storage, out) -> dict:
    return json.loads(storage.read_text(join(out, LEASE)))


def _foreign(storage, out, *, expires: str, pid: int = 4242) -> None:
    """A lease written by a job on another machine (its pid cannot be checked here)."""
    storage.write_text(
        join(out, LEASE),
        json.dumps(
            {
                "token": "elsewhere",
                "job": "jobs.distill",
                "host": "node-7",
                "pid": pid,
                "process_space": "another-machine",
                "started": "2026-01-02T03:04:05.000Z",
                "renewed": "2026-01-02T03:04:05.000Z",
                "expires": expires,
                "ttl_s": 60,
            }
        ),
    )


# ----------------------------------------------------------------------------- every store


@pytest.mark.parametrize("store", ["local", "s3", "gs"], indirect=True)
@pytest.mark.timeout(60)
def test_a_second_holder_is_refused_naming_the_first_until_it_releases(store):
    storage, root = store
    out = join(root, OUT)
    first = _lease(storage, out).acquire()
    holder = _holder(storage, out)
    assert (holder["job"], holder["run"], holder["pid"]) == ("jobs.finetune", "exp", os.getpid())
    assert holder["host"] == socket.gethostname() and holder["expires"] > holder["renewed"]
    second = _lease(storage, out, job="jobs.distill")
    with pytest.raises(LeaseHeld) as refused:
        second.acquire()
    assert re.fullmatch(
        rf"run dir {re.escape(repr(out))} is in use by jobs\.finetune \(pid {os.getpid()} on "
        rf"host {HOST}, since \d\d:\d\d:\d\d UTC, renewed [0-2] s ago\); wait for it to end, "
        r"or pick another run\.name",
        str(refused.value),
    ), str(refused.value)
    assert refused.value.holder["token"] == holder["token"] and not second.held
    assert cli.exit_code(refused.value) == 2  # the jobs' exit status for it
    assert _holder(storage, out) == holder  # the refused one changed nothing
    first.release()
    assert not storage.exists(join(out, LEASE)) and not first.held
    second.acquire()
    assert _holder(storage, out)["job"] == "jobs.distill"
    second.release()
    assert not storage.exists(join(out, LEASE))


@pytest.mark.parametrize("store", ["local", "s3", "gs"], indirect=True)
@pytest.mark.timeout(60)
def test_renewal_extends_the_expiry_and_keeps_others_out_past_the_ttl(store):
    storage, root = store
    out = join(root, OUT)
    with _lease(storage, out, ttl_s=0.75) as lease:  # renewed every 0.25 s
        first = _holder(storage, out)
        time.sleep(1.2)  # past the ttl: without the renewals the lease would have lapsed
        later = _holder(storage, out)
        assert later["token"] == first["token"] and later["started"] == first["started"]
        assert later["expires"] > first["expires"] and later["renewed"] > first["renewed"]
        with pytest.raises(LeaseHeld):
            _lease(storage, out, job="jobs.distill").acquire()
        assert lease.renew() and _holder(storage, out)["expires"] >= later["expires"]
    assert not storage.exists(join(out, LEASE))


@pytest.mark.parametrize("store", ["local", "s3", "gs"], indirect=True)
@pytest.mark.timeout(60)
def test_an_expired_lease_is_taken_over_saying_so_and_its_old_holder_knows(store):
    storage, root = store
    out = join(root, OUT)
    said: list[str] = []
    old = _lease(storage, out, ttl_s=0.5).acquire()  # no renewing thread: it will lapse
    with pytest.raises(LeaseHeld):
        _lease(storage, out, job="jobs.distill").acquire()
    time.sleep(0.7)
    new = _lease(storage, out, job="jobs.distill", log=said.append).acquire()
    assert len(said) == 1 and re.fullmatch(
        rf"\[lease\] run dir {re.escape(repr(out))}: taking over from jobs\.finetune "
        rf"\(pid {os.getpid()} on host {HOST}, since .* UTC, renewed [01] s ago\): its lease "
        r"expired \(not renewed for [01] s\)",
        said[0],
    ), said
    assert _holder(storage, out)["token"] == new.token
    old.release()  # it is not the old holder's any more: the new lease stays
    assert _holder(storage, out)["token"] == new.token
    assert not old.renew() and not old.held
    # a lease from another machine: not expired -> refused, expired -> taken over
    new.release()
    _foreign(storage, out, expires="2999-01-01T00:00:00.000Z")
    with pytest.raises(LeaseHeld, match=r"in use by jobs\.distill \(pid 4242 on host node-7, "):
        _lease(storage, out).acquire()
    _foreign(storage, out, expires="2026-01-02T03:05:05.000Z")
    _lease(storage, out, log=said.append).acquire().release()
    assert "taking over from jobs.distill (pid 4242 on host node-7, since 2026-01-02" in said[-1]


@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
@pytest.mark.timeout(60)
def test_racing_jobs_on_an_object_store_exactly_one_wins_each_time(store):
    """4 threads (the server decides, not the process) for a free lease and, every other
    time, for an expired one: a conditional create or a conditional replace."""
    storage, root = store
    for i in range(4):
        out = join(root, f"race-{i}")
        if i % 2:
            _foreign(storage, out, expires="2026-01-02T03:05:05.000Z")
        barrier, wins = threading.Barrier(4), []

        def contend(n: int, out=out, barrier=barrier, wins=wins) -> None:
            lease = _lease(Storage(storage.cfg), out, job=f"jobs.x{n}")
            barrier.wait()
            try:
                lease.acquire()
                wins.append(lease.job)
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=contend, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(wins) == 1, (i, wins)
        assert _holder(storage, out)["job"] == wins[0]


# ----------------------------------------------------------------------------- local only


_barrier = None  # in each pool process: the 4 contenders leave it together


def _join(barrier) -> None:
    global _barrier
    _barrier = barrier


def _contend(out: str) -> bool:
    _barrier.wait(timeout=30)
    try:
        _lease(Storage(), out, job=f"jobs.p{os.getpid()}").acquire()  # held until the pool ends
        return True
    except LeaseHeld:
        return False


@pytest.mark.timeout(120)
def test_racing_processes_exactly_one_wins_each_time(tmp_path):
    """20 rounds of 4 processes leaving a barrier together: half for a free lease (os.link),
    half for an expired one (the compare-and-swap under flock)."""
    storage = Storage()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4, initializer=_join, initargs=(ctx.Barrier(4),)) as pool:
        for i in range(20):
            out = str(tmp_path / f"out-{i}")
            if i % 2:
                _foreign(storage, out, expires="2026-01-02T03:05:05.000Z")
            wins = pool.map(_contend, [out] * 4, chunksize=1)
            assert sum(wins) == 1, (i, wins)
            assert _holder(storage, out)["job"].startswith("jobs.p")
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary left behind


@pytest.mark.timeout(60)
def test_a_lease_whose_process_died_on_this_machine_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "run")
    code = (
        "import sys; from raylens.lease import Lease; "
        "Lease(sys.argv[1], job='jobs.finetune', what='run dir', key='run.name').acquire()"
    )  # exits holding a 60 s lease, never released
    child = subprocess.run([sys.executable, "-c", code, join(out, LEASE)], timeout=60)
    assert child.returncode == 0
    dead = _holder(Storage(), out)
    assert dead["pid"] != os.getpid() and dead["expires"] > dead["renewed"]
    said: list[str] = []
    lease = _lease(Storage(), out, log=said.append).acquire()
    assert len(said) == 1 and re.fullmatch(
        rf"\[lease\] run dir {re.escape(repr(out))}: taking over from jobs\.finetune \(pid "
        rf"{dead['pid']} on host {HOST}, since .* UTC, renewed \d+ s ago\): its process "
        rf"\(pid {dead['pid']}\) is gone",
        said[0],
    ), said
    lease.release()
    # the same dead pid recorded by another machine proves nothing: refused until it expires
    _foreign(Storage(), out, expires="2999-01-01T00:00:00.000Z", pid=dead["pid"])
    with pytest.raises(LeaseHeld):
        _lease(Storage(), out).acquire()


def test_an_unreadable_lease_is_taken_over_and_a_storage_failure_is_exit_1(tmp_path):
    out = str(tmp_path / "run")
    Storage().write_text(join(out, LEASE), "{not json")
    said: list[str] = []
    _lease(Storage(), out, log=said.append).acquire().release()
    assert said == [
        f"[lease] run dir {out!r}: taking over from an unreadable lease: its lease object is "
        "unreadable"
    ]
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(StorageError, match=r"run dir .*: taking its lease .* failed") as err:
        _lease(Storage(), str(tmp_path / "file" / "run")).acquire()
    assert cli.exit_code(err.value) == 1
    with hold("", job="jobs.prepare", what="dataset output ''", key="prepare.output"):
        pass  # nothing to lease: the job's own check refuses an empty output


# ----------------------------------------------------------------------------- the jobs

# jobs.prepare with every shard flush slowed down: a winner that is mid-write for seconds
SLOW_PREPARE = (
    "import runpy, sys, time; import raylens.data.prepare as P; flush = P.ShardWriter.flush; "
    "P.ShardWriter.flush = lambda self: (time.sleep(1.0), flush(self))[1]; "
    "sys.argv[0] = 'jobs.prepare'; runpy.run_module('jobs.prepare', run_name='__main__')"
)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _refusal(job: str, what: str, pid: int, key: str) -> str:
    return (
        rf"python -m jobs\.{job}: error: {what} is in use by jobs\.{job} \(pid {pid} on host "
        rf"{HOST}, since \d\d:\d\d:\d\d UTC, renewed \d+ s ago\); wait for it to end, or "
        rf"pick another {re.escape(key)}"
    )


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_two_prepare_jobs_on_one_output_one_writes_it_the_other_is_refused(tmp_path):
    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=10)
    out = tmp_path / "ds"
    args = [f"source.uri={tmp_path / 'raw'}", f"prepare.output={out}", "prepare.shard_rows=8"]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(
            [sys.executable, "-c", SLOW_PREPARE, *args], cwd=REPO, stdout=f, stderr=f
        )
    try:
        _wait_for(out / LEASE, first, log, 60)
        second = run_job("prepare", *args)  # while the first is writing shards
    finally:
        first.wait(timeout=90)
    assert second.returncode == 2, second.stderr[-2000:]
    assert re.fullmatch(
        _refusal("prepare", re.escape(f"dataset output {str(out)!r}"), first.pid, "prepare.output"),
        second.stderr.strip(),
    ), second.stderr
    assert first.returncode == 0, log.read_text()[-3000:]
    card = json.loads((out / "dataset.json").read_text())
    listed = sorted(f for s in card["splits"].values() for f in s["files"])
    assert listed == sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert card["total"] == 30 and len(listed) >= 4  # 8-row shards: 24 train rows, 3+ files
    assert not (out / LEASE).exists() and not list(out.rglob(".tmp-*"))


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_second_finetune_of_a_running_run_is_refused_and_a_rerun_after_it_died_works(
    tmp_path, no_ray_here
):
    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=8)
    prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    run = tmp_path / "runs" / "r"
    args = [
        f"data.dataset={tmp_path / 'ds'}",
        "data.image_size=16",
        "data.batch_size=8",
        "model.backbone=vgg_s8",
        "train.epochs=1",
        "ray.num_workers=1",
        "ray.local_num_cpus=2",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=r",
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # its own process group: killed below with the Ray it starts
        first = subprocess.Popen(
            [sys.executable, "-m", "jobs.finetune", *args],
            cwd=REPO,
            stdout=f,
            stderr=f,
            start_new_session=True,
        )
    try:
        _wait_for(run / LEASE, first, log, 60)
        t0 = time.monotonic()
        second = run_job("finetune", *args)
        seconds = time.monotonic() - t0
        assert first.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without releasing
        first.wait(timeout=30)
    assert second.returncode == 2, second.stderr[-2000:]
    assert re.fullmatch(
        _refusal("finetune", re.escape(f"run dir {str(run)!r}"), first.pid, "run.name"),
        second.stderr.strip(),
    ), second.stderr
    assert seconds < 30, seconds  # no Ray: the interpreter's start-up and a few reads
    assert "Ray" not in second.stdout + second.stderr
    assert _holder(storage, str(run))["pid"] == first.pid  # left behind by the dead holder
    # the same run name again: the dead holder's lease is taken over at once, the run trains
    again = run_job("finetune", *args)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert (
        f"[lease] run dir {str(run)!r}: taking over from jobs.finetune (pid {first.pid} on "
        in again.stderr
    ) and f"its process (pid {first.pid}) is gone" in again.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["epoch"] for r in rows] == [1] and (run / "test_metrics.json").exists()
    assert not (run / LEASE).exists()
