"""Resource budget: Ray Data always keeps CPUs; bad settings name the key."""

from __future__ import annotations

import pytest
from raylens.config import ConfigError
from raylens.runtime.resources import plan_resources
from raylens.schema import RayConfig


def test_two_cpus_two_workers_leave_a_cpu_for_data():
    plan = plan_resources(2.0, RayConfig(num_workers=2))
    assert plan.data_cpus == 1.0
    assert plan.cpus_per_worker == 0.5
    assert plan.cpus_per_worker * 2 + plan.data_cpus <= 2.0


def test_large_cluster_gives_workers_whole_cpus():
    plan = plan_resources(64.0, RayConfig(num_workers=4, use_gpu=True))
    assert plan.data_cpus == 16.0 and plan.cpus_per_worker == 12.0 and plan.gpus_per_worker == 1.0


def test_explicit_worker_cpus_leave_the_rest_to_ray_data():
    # 1 GPU worker x 2 CPUs on 16 CPUs: ingest gets the other 14, not a fixed 25 % (4)
    plan = plan_resources(16.0, RayConfig(num_workers=1, use_gpu=True, cpus_per_worker=2.0))
    assert plan.cpus_per_worker == 2.0 and plan.data_cpus == 14.0
    plan = plan_resources(64.0, RayConfig(num_workers=4, use_gpu=True, cpus_per_worker=4.0))
    assert plan.data_cpus == 48.0
    # an explicit data_cpus still wins; at least 1 CPU is always left to Ray Data
    plan = plan_resources(16.0, RayConfig(num_workers=1, cpus_per_worker=2.0, data_cpus=6.0))
    assert plan.data_cpus == 6.0
    plan = plan_resources(3.0, RayConfig(num_workers=1, cpus_per_worker=2.0))
    assert plan.data_cpus == 1.0


def test_explicit_oversubscription_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        plan_resources(2.0, RayConfig(num_workers=2, cpus_per_worker=1.0))
    with pytest.raises(ConfigError, match="ray.data_cpus"):
        plan_resources(2.0, RayConfig(num_workers=1, data_cpus=2.0))
    with pytest.raises(ConfigError, match="ray.data_cpus"):
        plan_resources(2.0, RayConfig(num_workers=1, data_cpus=0.0))
