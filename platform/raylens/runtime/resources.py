"""Resource budget for Train workers and Ray Data ingest (pure: no Ray import).

Ray Train hands its workers' CPUs to Ray Data as excluded resources; if the workers take
every CPU, Ray Data has a budget of zero and training hangs waiting for batches that
are never produced (seen with ``ray.init(num_cpus=2)`` + 2 workers of 1 CPU each). The
plan below always leaves Ray Data at least ``data_cpus``.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylens.config import ConfigError
from raylens.schema import RayConfig


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float
    cluster_cpus: float

    def describe(self) -> str:
        return (
            f"{self.num_workers} train worker(s) x {self.cpus_per_worker:g} CPU"
            f"{f' + {self.gpus_per_worker:g} GPU' if self.gpus_per_worker else ''}, "
            f"Ray Data {self.data_cpus:g} CPU, cluster {self.cluster_cpus:g} CPU"
        )


def plan_resources(cluster_cpus: float, cfg: RayConfig) -> ResourcePlan:
    """Splits the cluster's CPUs between train workers and Ray Data.

    Ray Data keeps ``cfg.data_cpus``; the workers share the rest evenly, fractionally if
    need be (logical CPUs may be fractional). ``data_cpus`` null: whatever explicit
    ``cpus_per_worker`` leave (at least 1), else ``max(1, 25 %)`` of the CPUs. A GPU worker
    needs few CPUs while its ingest needs many: with a fixed 25 %, a 1-GPU run with 2 CPUs
    per worker on a 16-CPU machine decoded on 4 CPUs and left 10 idle, feeding an H200
    ~490 images/s of the ~2,300 its step takes (benchmarks/gpu.py).

    Raises:
        ConfigError: when explicit settings leave Ray Data no CPU or oversubscribe the cluster.
    """
    workers = cfg.num_workers
    if cfg.data_cpus is not None:
        data = cfg.data_cpus
    elif cfg.cpus_per_worker is not None:
        data = max(1.0, cluster_cpus - workers * cfg.cpus_per_worker)
    else:
        data = max(1.0, 0.25 * cluster_cpus)
    if data <= 0:
        raise ConfigError("config key 'ray.data_cpus': expected > 0 (ingest would starve and hang)")
    if data >= cluster_cpus:
        raise ConfigError(
            f"config key 'ray.data_cpus': {data:g} leaves no CPU for train workers "
            f"on a cluster of {cluster_cpus:g} CPUs"
        )
    if cfg.cpus_per_worker is not None:
        per = cfg.cpus_per_worker
        if per * workers + data > cluster_cpus + 1e-9:
            raise ConfigError(
                f"config key 'ray.cpus_per_worker': {workers} x {per:g} CPU + {data:g} for Ray Data "
                f"exceeds the cluster's {cluster_cpus:g} CPUs; lower it or leave it null"
            )
    else:
        per = (cluster_cpus - data) / workers
        per = max(0.01, (int(per * 100)) / 100) if per < 1 else float(int(per))
    return ResourcePlan(workers, per, 1.0 if cfg.use_gpu else 0.0, data, cluster_cpus)


# ----------------------------------------------------------------------------- stalls


class StallClock:
    """When a run counts as stalled (``ray.stall_timeout_s``): for ``timeout_s`` seconds on
    end, resources stayed pending and the run reported nothing.

    Either alone is normal: an epoch longer than the timeout reports nothing while its
    tasks run, and a busy cluster queues tasks for a moment while the run keeps reporting.
    Both together, that long, is a pipeline waiting for CPUs (or GPUs) that something else
    holds: ``make demo``'s sweep waited for ever on a decode task while finished trials'
    placement groups held the cluster's CPUs.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.since: float | None = None  # start of the current pending, silent stretch
        self.reports = -1

    def update(self, now: float, *, pending: bool, reports: int) -> bool:
        """Feeds one observation (``now`` in seconds, any monotonic clock; ``reports``: the
        run's reports so far). True once stalled."""
        if not pending or reports != self.reports:
            self.since = None if not pending else now
            self.reports = reports
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.timeout_s

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since


def format_resources(resources: dict[str, float]) -> str:
    """``{"CPU": 1.0, "memory": 5e8}`` -> ``"1 CPU"``: the schedulable units people read
    (CPU, GPU, custom resources; ``CPU_group_<id>`` is a CPU of placement group ``<id>``);
    memory and Ray's internal resources are left out."""
    parts = []
    for key, value in sorted(resources.items()):
        if not value or key in ("memory", "object_store_memory") or key.startswith("node:"):
            continue
        name, _, group = key.partition("_group_")
        if name == "bundle":
            continue
        group = group.rsplit("_", 1)[-1]  # CPU_group_<index>_<id> or CPU_group_<id>
        parts.append(f"{value:g} {name}" + (f" of placement group {group[:8]}" if group else ""))
    return " + ".join(parts) or "no CPU/GPU"


def stall_message(
    run: str,
    *,
    timeout_s: float,
    stalled_s: float,
    pending: list[str],
    holders: list[str],
    free: dict[str, float],
    total: dict[str, float],
) -> str:
    """The error of a stalled run: what waits, what holds the resources, what is free.

    Args:
        pending: one entry per kind of waiting demand, e.g. ``"2 task(s) wanting 1 CPU
            (MapBatches(_DecodeBatch))"``.
        holders: one entry per placement group holding CPUs/GPUs, e.g. ``"3f2a9c01 (run
            't_0001', ended): 1 CPU"``.
    """
    cpu = f"CPU {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} free"
    gpu = f", GPU {free.get('GPU', 0.0):g} of {total['GPU']:g} free" if total.get("GPU") else ""
    return (
        f"run {run!r} made no progress for {stalled_s:.0f} s while resources stayed pending "
        f"(ray.stall_timeout_s={timeout_s:g}); waiting: "
        + ("; ".join(pending) or "unknown demand")
        + "; held by placement groups: "
        + ("; ".join(holders) or "none")
        + f"; {cpu}{gpu}. Free what holds them (a finished run's placement group: "
        "ray.util.remove_placement_group) or raise ray.stall_timeout_s (null: no limit)"
    )
