"""Node loss on a local multi-node Ray: a head (1 logical CPU) and two worker nodes (2 each)
on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests build one), each with its
own raylet and object store (150 MiB). Each worker node carries one unit of the custom
resource ``pool``: train workers ask for it (``ray.worker_resources``) and so do Serve's
model replicas, so there is one of them on each worker node and none on the head, which
holds the driver.

In each test a worker node is killed at a fixed point of a real workload
(``remove_node(allow_graceful=False)``: its raylet, object store and every worker process
on it die at once) and a replacement node joins right after, as an autoscaler would
bring one:

- a 2-worker TorchTrainer run (``raylens.train.finetune``): completes from its last
  checkpoint; ``metrics.jsonl`` records the restart with its cause;
- embeddings (``raylens.infer.embed``): the output has every id exactly once;
- Serve under steady load: recovers; the error rate and recovery time are printed and
  bounded;
- a Tune sweep (``raylens.tune.sweep``): finishes, every trial once.

One cluster serves the module. The session's local Ray is shut down while it runs and
comes back afterwards (as the ``no_ray_here`` fixture does). Node deaths are detected in
about 3 s here (GCS health checks every second, 3 misses); Ray's defaults (every 3 s,
5 misses) take about 15 s, which a real cluster adds to every recovery time below.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from raylens import config as C
from raylens.schema import RunConfig
from raylens.storage import Storage

from tests.conftest import start_test_ray
from tests.imagegen import class_image
from tests.sourcegen import prepare_quiet, write_folder, write_idx
from tests.test_ray_faults import _WorkerGroupError

HEAD = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
WORKER = {"num_cpus": 2, "object_store_memory": 150 * 2**20, "resources": {"pool": 1}}
CPUS = HEAD["num_cpus"] + 2 * WORKER["num_cpus"]
FAST_DETECTION = {  # the GCS marks a node dead ~3 s after its raylet went (default ~15 s)
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}
ON_WORKER_NODES = "ray.worker_resources={pool: 1}"
T = TypeVar("T")


class Nodes:
    """The module's cluster: the head (where the driver runs) and the worker nodes."""

    def __init__(self, cluster):
        self.cluster = cluster

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def hosting(self, marker: str) -> list:
        """Worker nodes running a process whose title contains ``marker`` (Ray titles its
        worker processes ``ray::<actor class>``)."""
        import psutil

        found = []
        for node in self.workers:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            for proc in raylet.children(recursive=True):
                try:
                    if marker in " ".join(proc.cmdline()):
                        found.append(node)
                        break
                except psutil.Error:
                    continue
        return found

    def kill_and_replace(self, node) -> dict[str, float]:
        """Kills ``node`` at once, then adds a replacement worker node. Returns ``{"at":
        time.time() of the kill, "kill_s", "replaced_s": seconds after it}``."""
        import psutil

        workers = psutil.Process(node.all_processes["raylet"][0].process.pid).children(True)
        t0 = time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        for proc in workers:  # they would exit within ~1 s of their raylet: at once, here
            with contextlib.suppress(psutil.Error):
                proc.kill()
        killed = time.time()
        self.cluster.add_node(**WORKER)
        return {"at": t0, "kill_s": killed - t0, "replaced_s": time.time() - t0}

    def wait_whole(self, timeout: float = 60) -> None:
        """Until the cluster has its three live nodes and all their CPUs free."""
        import ray

        deadline = time.time() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            free = ray.available_resources().get("CPU", 0)
            if len(alive) == 3 and free == CPUS:
                return
            assert time.time() < deadline, (len(alive), ray.available_resources())
            time.sleep(0.5)


@pytest.fixture(scope="module")
def nodes():
    import ray
    from ray.cluster_utils import Cluster

    was = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster()
    try:
        cluster.add_node(**HEAD, include_dashboard=False, _system_config=FAST_DETECTION)
        for _ in range(2):
            cluster.add_node(**WORKER)
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}},
        )
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
        yield Nodes(cluster)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was:
            start_test_ray()


def with_node_loss(
    nodes: Nodes,
    workload: Callable[[], T],
    *,
    marker: str,
    ready: Callable[[], object],
    recovered: Callable[[], bool] | None = None,
    timeout_s: float = 240,
) -> tuple[T, dict]:
    """Runs ``workload`` in a thread; once ``ready()`` returns something true, kills a
    worker node hosting a ``marker`` process and brings a replacement in (here, in the main
    thread: Ray starts a node only there), then notes when ``recovered()`` first holds.

    Returns the workload's result and ``{"state": what ready() returned, "at": time of
    the kill, "kill_s", "replaced_s", "recovered_s": seconds after it, "took_s"}``.
    """
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = workload()
        except BaseException as err:  # re-raised below, in the test's thread
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.time()
    deadline = t0 + timeout_s
    thread.start()
    info: dict = {}
    while thread.is_alive() and not info and time.time() < deadline:
        state = ready()
        victims = nodes.hosting(marker) if state else []
        if victims:
            info = {"state": state, **nodes.kill_and_replace(victims[0])}
        time.sleep(0.05)
    while recovered is not None and info and time.time() < deadline:
        alive = thread.is_alive()
        if recovered():
            info["recovered_s"] = time.time() - info["at"]
            break
        if not alive:
            break
        time.sleep(0.1)
    thread.join(timeout=max(1.0, deadline - time.time()))
    assert not thread.is_alive(), f"the workload did not end within {timeout_s:.0f} s ({info})"
    if "error" in out:
        raise out["error"]
    assert info, f"the workload ended before a worker node hosting {marker!r} was killed"
    info["took_s"] = time.time() - t0
    return out["value"], info


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _metric_rows(path: Path) -> list[dict]:
    return [r for r in _rows(path) if "event" not in r]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("multinode")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=30)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    return str(root / "ds")


def _train_cfg(dataset: str, out: Path, name: str, *extra: str) -> RunConfig:
    return C.load(
        RunConfig,
        None,
        [
            f"run.name={name}",
            f"run.output_dir={out}",
            f"data.dataset={dataset}",
            "data.image_size=16",
            "data.batch_size=4",
            "data.eval_crop_pct=1.0",
            "model.backbone=vgg_s8",
            "train.lr=0.005",
            "train.warmup_epochs=0",
            ON_WORKER_NODES,
            "ray.max_failures=1",
            *extra,
        ],
    )


def _say(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[cluster] {line}")


# ----------------------------------------------------------------------------- train


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_train_run_that_loses_a_worker_node_completes_from_its_last_checkpoint(
    nodes, dataset, tmp_path, capsys
):
    """2 workers, one on each worker node; the node of one dies once Ray Train registered
    epoch 1's checkpoint (of 4). Ray Train restarts the worker group (ray.max_failures=1)
    on the surviving node and the replacement; the run resumes from that checkpoint (or a
    later one registered during the kill) and metrics.jsonl records the restart."""
    from raylens.train import finetune

    nodes.wait_whole()
    run = tmp_path / "runs" / "node"
    metrics = run / "metrics.jsonl"
    cfg = _train_cfg(dataset, tmp_path / "runs", "node", "ray.num_workers=2", "train.epochs=4")
    out, info = with_node_loss(
        nodes,
        lambda: finetune(cfg),
        marker="RayTrainWorker",
        ready=lambda: _registered(run),
        recovered=lambda: any(r.get("resumes") for r in _metric_rows(metrics)),
    )
    rows = _rows(metrics)
    metric_rows = [r for r in rows if "event" not in r]
    events = [r for r in rows if "event" in r]
    _say(
        capsys,
        f"train: node killed once epoch {info['state']}'s checkpoint was registered (kill "
        f"{info['kill_s']:.1f} s, replacement node up {info['replaced_s']:.1f} s); first "
        f"resumed epoch reported {info.get('recovered_s', float('nan')):.1f} s after the kill; "
        f"run {info['took_s']:.0f} s; recorded: {events}",
    )
    assert info["state"] < 4, info  # killed before the run ended
    assert [r["epoch"] for r in metric_rows] == [1, 2, 3, 4], rows  # no epoch lost or twice
    assert [e["event"] for e in events] == ["restart"], events
    event = events[0]
    assert event["kind"] in ("node_lost", "worker_lost") and event["restarts"] == 1, event
    assert event["cause"].startswith("rank ") and "/" not in event["cause"], event
    # rows before the loss come from the first worker group (resumes 0), the rest from
    # the one Ray Train started instead, resumed from the checkpoint registered before
    at = rows.index(event)
    assert [r["resumes"] for r in rows[:at]] == [0] * at
    assert [r["resumes"] for r in rows[at + 1 :]] == [1] * (len(rows) - at - 1)
    first = next(r for r in metric_rows if r["resumes"])
    assert first["epoch"] in (info["state"] + 1, info["state"] + 2), (first, info)
    assert out["best"] is not None and out["test"]["count"] == 9
    assert info.get("recovered_s", float("inf")) < 90, info


def _registered(run: Path) -> int:
    """The last epoch whose checkpoint Ray Train's controller registered (its snapshot in
    the run dir; Ray 2.60's format); 0: none yet. A checkpoint reported but not registered
    when the workers are lost is not resumed from."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max((c["metrics"]["epoch"] for c in snapshot["checkpoint_results"]), default=0)


# ----------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> tuple[str, list[str]]:
    """2,400 28x28 images (IDX), prepared in shards of 100; with their ids."""
    from tests.sourcegen import read_prepared

    root = tmp_path_factory.mktemp("multinode-embed")
    storage = Storage()
    write_idx(storage, str(root / "raw"), n_train=2000, n_test=400)
    prepare_quiet(
        storage,
        str(root / "raw"),
        str(root / "ds"),
        kind="idx",
        idx_verify_checksum=False,
        shard_rows=100,  # 24 shards: the embed job streams them, a file at a time
    )
    _, rows = read_prepared(storage, str(root / "ds"))
    return str(root / "ds"), [r["id"] for r in rows]


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_embeddings_survive_losing_a_node_every_id_exactly_once(
    nodes, big_dataset, tmp_path, capsys
):
    """2,400 images, 2 model actors of 1 CPU (at least one on a worker node: the head has
    1 CPU); the worker node of one dies once the first output files are staged. Ray Data
    restarts the actor and re-runs what was lost; the committed output holds every input
    id exactly once."""
    import pyarrow.parquet as pq
    from raylens.infer.embed import load_manifest, plan_embed, run_embed

    nodes.wait_whole()
    ds, ids = big_dataset
    out = tmp_path / "emb"
    cfg = C.load(
        RunConfig,
        None,
        [
            f"data.dataset={ds}",
            "embed.model=vgg_s8",
            "embed.image_size=224",  # ~8 s of model work after the first file is staged
            f"embed.output={out}",
            "embed.batch_size=16",
            "embed.rows_per_file=64",
            "embed.concurrency=2",
        ],
    )
    plan = plan_embed(cfg)

    def staged() -> int:
        return len(list(out.glob("_staging-*/*.parquet")))

    t0 = time.time()
    manifest, info = with_node_loss(
        nodes, lambda: run_embed(plan), marker="EmbedBatch", ready=staged
    )
    took = info["took_s"]
    table = pq.read_table(out)
    got = table.column("id").to_pylist()
    _say(
        capsys,
        f"embed: node killed {info['at'] - t0:.1f} s into the job, after {info['state']} "
        f"staged file(s); job {took:.1f} s; {len(got)} rows for {len(ids)} ids, "
        f"{len(got) - len(set(got))} repeated",
    )
    assert info["at"] < t0 + took and info["state"] < len(manifest["files"]), info
    assert len(got) == len(set(got)) and set(got) == set(ids)  # every id exactly once
    assert manifest["rows"] == len(ids) and not manifest["dropped"], manifest
    assert load_manifest(Storage(), str(out))["files"] == manifest["files"]
    embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert embedding.shape == (len(ids), manifest["dim"]) and np.isfinite(embedding).all()
    assert not list(out.glob("_staging-*"))


# ----------------------------------------------------------------------------- Serve


class SteadyLoad:
    """``clients`` threads posting ``/v1/classify`` in a loop (as the replica-kill test in
    tests/test_serve.py does); every answer logged as ``(time, status)``, -1 for no answer."""

    def __init__(self, url: str, images: list[bytes], clients: int = 4):
        self.url, self.images = url, images
        self.log: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(clients)]

    def loop(self, seed: int) -> None:
        import httpx

        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop_event.is_set():
                image = self.images[int(rng.integers(len(self.images)))]
                try:
                    code = client.post(
                        "/v1/classify", content=image, headers={"content-type": "image/png"}
                    ).status_code
                except Exception:
                    code = -1
                with self.lock:
                    self.log.append((time.time(), code))

    def start(self) -> SteadyLoad:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join()

    def ok(self) -> int:
        with self.lock:
            return sum(code == 200 for _, code in self.log)

    def codes(self, start: float, end: float = float("inf")) -> list[tuple[float, int]]:
        with self.lock:
            return [(ts, c) for ts, c in self.log if start <= ts <= end]


def _replicas() -> set[str]:
    """The live ModelServer replicas' actor names (each replica has its own)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if "#ModelServer#" in a["name"]}


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_serve_under_load_recovers_from_losing_a_replicas_node(nodes, tmp_path, capsys):
    """2 model replicas, one on each worker node (one "pool" each), the ingress and the one
    HTTP proxy on the head; 4 clients classify in a loop. After 40 answers the worker node of a
    replica dies; Serve replaces the replica. Requests that failed while it did, and the
    time until 2 replicas run again, are printed and bounded."""
    from ray import serve

    from serve.app import make_app
    from tests.test_embed import make_run
    from tests.test_serve import _free_port

    nodes.wait_whole()
    run = tmp_path / "run"
    make_run(Storage(), str(run))
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        app = make_app(
            # split: the ingress on the head retries a call whose model replica died
            {"models": [{"id": "tiny", "run": str(run)}], "topology": "split"},
            # one replica on each worker node (one "pool" each)
            model_options={
                "num_replicas": 2,
                "ray_actor_options": {"num_cpus": 1, "resources": {"pool": 1}},
            },
            # the ingress beside the proxy on the head: the loss takes a model replica only
            ingress_options={
                "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}}
            },
        )
        serve.run(app, name="raylens", route_prefix="/")

        def running() -> int:
            dep = serve.status().applications["raylens"].deployments["ModelServer"]
            return dep.replica_states.get("RUNNING", 0)

        images = [class_image(c, i) for c in range(3) for i in range(10)]
        deadline = time.time() + 180
        load = SteadyLoad(f"http://127.0.0.1:{port}", images).start()
        try:
            while load.ok() < 40:
                assert time.time() < deadline, "the load got no 40 answers"
                time.sleep(0.1)
            replicas = _replicas()
            info = nodes.kill_and_replace(nodes.hosting("ServeReplica:raylens:ModelServer")[0])
            # recovered: 2 replicas run, one of them new (the controller may still count
            # the lost one as running for a moment)
            while not (running() == 2 and _replicas() - replicas):
                assert time.time() < deadline, "the lost replica was not replaced"
                time.sleep(0.1)
            info["recovered_s"] = time.time() - info["at"]
            time.sleep(3)  # answers after recovery
        finally:
            load.stop()
    finally:
        serve.shutdown()
    killed_at = info["at"]
    recovered_at = killed_at + info["recovered_s"]
    before = load.codes(0, killed_at)
    during = [c for _, c in load.codes(killed_at, recovered_at)]
    after = [c for _, c in load.codes(recovered_at)]
    failed = [(ts, c) for ts, c in load.codes(killed_at) if c != 200]
    errors = sum(c != 200 for c in during)
    rate = errors / max(len(during), 1)
    last_error = max((ts for ts, _ in failed), default=killed_at) - killed_at
    _say(
        capsys,
        f"serve: replica node killed under 4-client load: {errors}/{len(during)} requests "
        f"failed during recovery ({rate:.1%}; statuses {sorted(set(c for _, c in failed))}), "
        f"last failure {last_error:.1f} s after the kill, 2 replicas running again after "
        f"{info['recovered_s']:.1f} s; {len(after)} requests after, all ok: "
        f"{all(c == 200 for c in after)}",
    )
    assert all(c == 200 for _, c in before), before
    assert len(during) > 10 and after and all(c == 200 for c in after)
    assert info["recovered_s"] < 60, info
    assert rate <= 0.05, f"{errors}/{len(during)} failed during recovery"


# ----------------------------------------------------------------------------- Tune

SPACE = (
    "space:\n"
    "  train.lr: {type: loguniform, low: 1.0e-3, high: 3.0e-2}\n"
    "fixed:\n"
    "  train.warmup_epochs: 0.0\n"
)


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(400)
def test_a_sweep_that_loses_a_node_finishes_with_every_trial_once(nodes, dataset, tmp_path, capsys):
    """3 trials (FIFO, 2 epochs; 2 at a time: a trial plans over 2 of the 5 CPUs), each
    trial's worker on a worker node. Once a trial's first checkpoint is registered, the
    node of a running trial's worker dies: that trial's run restarts; the sweep finishes
    with 3 trials, none lost, none counted twice, each trial's epochs once."""
    import optuna
    import pandas as pd
    from raylens.tune.space import load_space
    from raylens.tune.sweep import cluster_resources, plan_sweep, run_sweep

    nodes.wait_whole()
    cfg = _train_cfg(
        dataset,
        tmp_path / "runs",
        "sw",
        "data.batch_size=16",
        "train.epochs=2",
        "tune.num_samples=3",
        "tune.n_startup_trials=3",
        "tune.scheduler=fifo",
        "tune.seed=3",
        "tune.retrain=false",
    )
    plan = plan_sweep(cfg, load_space(SPACE, cfg), cluster=cluster_resources())
    assert plan.concurrency == 2, plan
    exp = Path(plan.exp_dir)

    def first_checkpoint() -> str | None:
        for trial in exp.glob("trials/*"):
            rows = _metric_rows(trial / "metrics.jsonl")
            if _registered(trial) and rows and not rows[-1].get("final"):
                return trial.name
        return None

    lines: list[str] = []
    t0 = time.time()
    summary, info = with_node_loss(
        nodes,
        lambda: run_sweep(plan, log=lines.append),
        marker="RayTrainWorker",
        ready=first_checkpoint,
        timeout_s=360,
    )
    trials = pd.read_parquet(exp / "results" / "trials.parquet")
    logs = {tid: _rows(exp / "trials" / tid / "metrics.jsonl") for tid in trials["trial_id"]}
    events = {tid: [r for r in rows if "event" in r] for tid, rows in logs.items()}
    hit = [tid for tid, ev in events.items() if ev]
    _say(
        capsys,
        f"tune: a trial worker's node killed {info['at'] - t0:.0f} s into the sweep (trial "
        f"{info['state']} had checkpointed); sweep {info['took_s']:.0f} s, {summary['status']}; "
        f"recorded: {[events[t] for t in hit]}",
    )
    assert summary["trials"] == 3 and summary["status"]["error"] == 0, (summary, lines)
    assert len(trials) == 3 and trials["trial_id"].is_unique, trials  # none lost, none twice
    for tid, rows in logs.items():  # every trial ran its 2 epochs, each once
        assert [r["epoch"] for r in rows if "event" not in r] == [1, 2], (tid, rows)
    # the trial whose worker was on the lost node restarted (its worker only: one "pool"
    # per node), and says so
    assert len(hit) == 1, events
    assert [e["event"] for e in events[hit[0]]] == ["restart"], events
    assert events[hit[0]][0]["kind"] in ("node_lost", "worker_lost"), events
    study = optuna.load_study(
        study_name=plan.name,
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(plan.journal)
        ),
    )
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3, states  # one Optuna trial per Tune trial
    assert "[tune] trials' placement groups still holding resources: none" in lines, lines


# ----------------------------------------------------------------------------- unit


class ActorUnavailableError(Exception):
    pass


def test_a_lost_nodes_worker_and_its_peer_are_named_in_one_clean_line():
    """What Ray Train reported when a worker's node died (the texts of a real run): the
    lost rank unreachable, its peer's gloo error; no build path, port or emoji."""
    from raylens.runtime.launch import failure_cause

    unreachable = ActorUnavailableError(
        "A worker health check failed.\nWorker info: Worker(actor=Actor(RayTrainWorker, b96c))"
        "\nThe actor b96ceb68 is unavailable: The actor is temporarily unavailable: RpcError: "
        "RPC error: failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:192.0.2.2:42667: Failed to connect to remote host: Connection refused"
    )
    peer = RuntimeError(
        'Traceback (most recent call last):\n  File "/x/loop.py", line 9, in fit\n'
        "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] "
        "Connection closed by peer [127.0.0.1]:41653. This is typically caused by a remote "
        "worker crashing. Check the logs of the remote worker before reporting an error. "
        "GLHF! \U0001f3d6"
    )
    kind, cause = failure_cause(_WorkerGroupError({0: unreachable, 1: peer}))
    assert kind == "worker_lost"
    assert cause == (
        "rank 0: worker unreachable (its process or its node stopped answering); "
        "rank 1: collective call failed: a peer worker was lost"
    )


def test_a_restart_that_starts_over_keeps_the_recorded_restart(tmp_path, monkeypatch):
    """A worker group lost before Ray Train registered its first checkpoint restarts with
    none (seen: a node killed right after epoch 1's report). Its rank 0 starts a fresh
    history: the restart event recorded meanwhile stays in metrics.jsonl, the lost
    attempt's rows go (their weights are gone)."""
    import ray.train
    from raylens.rundir import RunDir
    from raylens.runtime.launch import make_reporter

    cfg = C.load(RunConfig, None, ["run.name=over", f"run.output_dir={tmp_path}"])
    run = RunDir.of(cfg, Storage())
    lost = {"epoch": 1, "step": 9, "resumes": 0, "val/top1": 0.5}
    event = {"event": "restart", "epoch": 1, "step": 9, "kind": "worker_lost", "cause": "x"}
    run.write_history([lost, event])
    monkeypatch.setattr(ray.train, "report", lambda *a, **kw: None)
    report, log = make_reporter(cfg, Storage(), 0, None)
    first = {"epoch": 1, "step": 9, "resumes": 0, "val/top1": 0.7}
    report(first, None)
    log.close()
    assert run.history() == [event, first]


def test_every_test_the_fault_matrix_names_exists():
    """docs/faults.md names its evidence as file::function: each one must be a test."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "faults.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(named) >= 40, named
    missing = [
        f"{path}::{name}"
        for path, name in sorted(named)
        if not re.search(rf"^def {name}\(", (root / path).read_text(), re.MULTILINE)
    ]
    assert not missing, missing
