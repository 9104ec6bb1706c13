"""The prepare job as users run it: python -m jobs.prepare, on the real Fashion-MNIST and on S3."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml
from raylens.data import fashion_mnist

from tests.repo import run_job
from tests.sourcegen import write_folder
from tests.stores import s3_storage

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(
    not os.path.exists(fashion_mnist.DEBIAN_DIR),
    reason="needs the Debian package dataset-fashion-mnist (installed by .ci/run)",
)
def test_fashion_mnist_demo_prepares_70k_and_prints_the_card(tmp_path):
    out = tmp_path / "fmnist"
    res = run_job("prepare", "--config", "jobs/configs/fashion_mnist.yaml", f"prepare.output={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "T-shirt/top" in res.stdout and "total      70000" in res.stdout
    card = json.loads((out / "dataset.json").read_text())
    assert card["total"] == 70000 and card["rejected"] == []
    assert card["splits"]["test"]["count"] == 10000
    assert card["splits"]["train"]["count"] + card["splits"]["val"]["count"] == 60000
    assert all(v == 1000 for v in card["splits"]["test"]["per_class"].values())
    assert yaml.safe_load((out / "config.yaml").read_text())["prepare"]["output"] == str(out)
    again = run_job(
        "prepare", "--config", "jobs/configs/fashion_mnist.yaml", f"prepare.output={out}"
    )
    assert again.returncode == 0 and "up to date" in again.stderr


def test_prepare_job_on_s3_never_shows_or_saves_credentials(seaweed):
    bucket = f"job-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    write_folder(storage, f"s3://{bucket}/raw", per_class=4)
    args = [
        f"source.uri=s3://{bucket}/raw",
        f"prepare.output=s3://{bucket}/ds",
        f"storage.s3_endpoint_url={seaweed.endpoint_url}",
        f"storage.s3_access_key_id={seaweed.access_key}",
        f"storage.s3_secret_access_key={seaweed.secret_key}",
    ]
    res = run_job("prepare", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = storage.read_text(f"s3://{bucket}/ds/config.yaml")
    for secret in (seaweed.secret_key, seaweed.access_key):
        assert secret not in saved and secret not in res.stdout and secret not in res.stderr
    assert json.loads(storage.read_text(f"s3://{bucket}/ds/dataset.json"))["total"] == 12
    # a wrong secret: one clear line naming the URI, no traceback, still no secret shown
    bad = run_job(
        "prepare",
        *args[:-1],
        "storage.s3_secret_access_key=NOT-the-secret-42",
        "prepare.overwrite=true",
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"s3://{bucket}" in bad.stderr and "does not match the signature" in bad.stderr
    assert (
        "NOT-the-secret-42" not in bad.stderr + bad.stdout and seaweed.access_key not in bad.stderr
    )


def test_missing_source_is_a_clear_error(tmp_path):
    res = run_job("prepare", f"source.uri={tmp_path / 'nope'}", f"prepare.output={tmp_path / 'ds'}")
    assert res.returncode == 2
    assert "no files found" in res.stderr and "nope" in res.stderr
    res = run_job("prepare", f"prepare.output={tmp_path / 'ds'}")
    assert res.returncode == 2 and "'source.uri' is required" in res.stderr
