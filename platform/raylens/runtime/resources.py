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

    Ray Data keeps ``cfg.data_cpus`` (default ``max(1, 25 %)`` of the CPUs); the workers
    share the rest evenly, fractionally if need be (logical CPUs may be fractional).

    Raises:
        ConfigError: when explicit settings leave Ray Data no CPU or oversubscribe the cluster.
    """
    workers = cfg.num_workers
    data = cfg.data_cpus if cfg.data_cpus is not None else max(1.0, 0.25 * cluster_cpus)
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
