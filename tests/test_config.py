"""Config schema: YAML + dotted overrides, strict keys and types, secrets, --help."""

from __future__ import annotations

import pytest
import yaml
from raylens import config as C
from raylens.schema import RunConfig

from tests.repo import REPO, run_job


def test_defaults_yaml_and_overrides_merge_in_order():
    cfg = C.load(
        RunConfig,
        "data:\n  image_size: 64\n  batch_size: 8\n",
        ["data.image_size=32", "ray.num_workers=2", "data.mean=[0.5, 0.5, 0.5]"],
    )
    assert cfg.data.image_size == 32  # override beats YAML
    assert cfg.data.batch_size == 8  # YAML beats default
    assert cfg.ray.num_workers == 2
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.prepare.train_fraction == 0.8  # untouched default


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(C.ConfigError) as err:
        C.load(RunConfig, None, ["data.img_size=64"])
    assert "'data.img_size'" in str(err.value)
    assert "did you mean 'data.image_size'" in str(err.value)
    with pytest.raises(C.ConfigError) as err:
        C.load(RunConfig, "prepare:\n  shard_row: 5\n")
    assert "'prepare.shard_row'" in str(err.value) and "'prepare.shard_rows'" in str(err.value)
    with pytest.raises(C.ConfigError, match="unknown config key 'dta'; did you mean 'data'"):
        C.load(RunConfig, "dta: {}\n")


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(C.ConfigError) as err:
        C.load(RunConfig, None, ["data.image_size=big"])
    assert "'data.image_size'" in str(err.value) and "expected int" in str(err.value)
    with pytest.raises(C.ConfigError, match=r"'ray.use_gpu': expected bool"):
        C.load(RunConfig, "ray:\n  use_gpu: 3\n")
    with pytest.raises(C.ConfigError, match=r"'data.mean': expected tuple\[float, float, float\]"):
        C.load(RunConfig, None, ["data.mean=[1, 2]"])
    with pytest.raises(C.ConfigError, match=r"'source.kind': expected one of"):
        C.load(RunConfig, None, ["source.kind=zip"])
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float key still takes it as a number
    assert C.load(RunConfig, "train:\n  lr: 3e-4\n", ["train.weight_decay=1E-5"]).train.lr == 3e-4
    with pytest.raises(C.ConfigError, match=r"'train.lr': expected float, got '3e-4x'"):
        C.load(RunConfig, None, ["train.lr=3e-4x"])


def test_validation_names_key():
    with pytest.raises(C.ConfigError, match="prepare"):
        C.load(RunConfig, None, ["prepare.train_fraction=0.9"])  # sums to 1.1


def test_secrets_never_saved_and_saved_config_reloads():
    cfg = C.load(
        RunConfig,
        None,
        ["storage.s3_access_key_id=AKIAFAKE", "storage.s3_secret_access_key=sup3rs3cret"],
    )
    text = C.to_yaml(cfg)
    assert "sup3rs3cret" not in text and "AKIAFAKE" not in text
    assert yaml.safe_load(text)["storage"]["s3_secret_access_key"] is None
    again = C.load(RunConfig, text)
    assert again.data == cfg.data and again.storage.s3_secret_access_key is None


def test_changed_keys_compares_a_saved_config_leaf_by_leaf():
    base = C.load(RunConfig, None, ["run.name=a", "train.lr=0.001"])
    saved = yaml.safe_load(C.to_yaml(base))  # what a run dir holds: tuples as lists
    assert C.flatten({"a": {"b": 1, "c": {"d": [2]}}}) == {"a.b": 1, "a.c.d": [2]}
    assert C.changed_keys(saved, C.to_dict(base)) == {}
    new = C.apply_overrides(
        base, ["train.lr=0.01", "data.mean=[0.5, 0.5, 0.5]", "ray.num_workers=4"]
    )
    diff = C.changed_keys(saved, C.to_dict(new))
    assert diff == {
        "train.lr": (0.001, 0.01),
        "data.mean": (None, [0.5, 0.5, 0.5]),  # null: the backbone's, until resolved
        "ray.num_workers": (base.ray.num_workers, 4),
    }
    assert set(C.changed_keys(saved, C.to_dict(new), ignore=("ray.", "data.mean"))) == {"train.lr"}
    del saved["train"]["lr"]  # saved before the schema had the key: not a difference
    assert set(C.changed_keys(saved, C.to_dict(new))) == {"data.mean", "ray.num_workers"}


def test_every_shipped_config_loads():
    files = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert files
    for path in files:
        C.load(RunConfig, path.read_text())


def test_job_help_lists_keys_with_defaults_and_docs():
    res = run_job("prepare", "--help")
    assert res.returncode == 0
    out = res.stdout
    assert "prepare.train_fraction = 0.8" in out
    assert "Train share when the source has no split." in out
    assert "source.uri" in out and "storage.s3_endpoint_url" in out


def test_job_rejects_bad_key_with_exit_2():
    res = run_job("prepare", "prepare.outptu=/tmp/x")
    assert res.returncode == 2
    assert "unknown config key 'prepare.outptu'; did you mean 'prepare.output'?" in res.stderr


def test_cluster_yaml_passes_the_ray_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # raises on any schema violation
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_decode_batch_rows_scale_with_image_size():
    from raylens.schema import DataConfig

    assert DataConfig(image_size=28).decode_rows() == 4096  # tiny images: big batches
    assert DataConfig(image_size=224).decode_rows() == 111  # ~16 MiB of pixels
    assert DataConfig(image_size=2048).decode_rows() == 32  # floor
    assert DataConfig(image_size=224, decode_batch_size=8).decode_rows() == 8


def test_yaml_boolean_words_map_back_to_string_options():
    assert C.load(RunConfig, None, ["train.amp=off"]).train.amp == "off"
    assert C.load(RunConfig, "train:\n  amp: off\n").train.amp == "off"
    with pytest.raises(C.ConfigError, match="'train.amp'"):
        C.load(RunConfig, None, ["train.amp=yes"])  # no matching option: still an error


def test_finetune_help_lists_model_task_and_train_keys():
    res = run_job("finetune", "--help")
    assert res.returncode == 0
    for key in (
        "model.backbone = 'resnet10t'",
        "task.focal_gamma = 2.0",
        "train.amp = 'auto'",
        "model.unfreeze_last_n = 'all'",
    ):
        assert key in res.stdout
    assert "prepare.shard_rows" not in res.stdout  # only the sections this job reads
