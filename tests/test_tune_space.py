"""Search spaces: every shipped space validates against its config; bad spaces are named
before any trial starts; sampling honours types, bounds and conditions (pure, no Ray)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from raylens import config as C
from raylens.config import ConfigError
from raylens.schema import RunConfig
from raylens.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = {
    "focal": "fashion_mnist_mosaic",
    "proxy_anchor": "metric_fashion_mnist_clutter",
    "distill": "distill_fashion_mnist",
    "classify": "fashion_mnist",
}


def _base(name: str) -> RunConfig:
    return C.load(RunConfig, (ROOT / "jobs" / "configs" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("space", sorted(SPACES))
def test_shipped_spaces_validate_and_sample_valid_configs(space):
    base = _base(SPACES[space])
    sp = load_space((ROOT / "tune_spaces" / f"{space}.yaml").read_text(), base, space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        chosen = sp.suggest(trial, base)
        cfg = C.apply_overrides(base, {**sp.fixed, **chosen})
        cfg.validate()
        for p in sp.params:
            if p.key not in chosen:
                assert p.when, p.key  # only conditional params are ever left out
                continue
            v = chosen[p.key]
            if p.kind == "choice":
                assert v in p.values
            else:
                assert p.low <= v <= p.high
        study.tell(trial, 0.0)


def test_shipped_spaces_cover_what_the_issue_asks():
    keys = {
        s: set(load_space((ROOT / "tune_spaces" / f"{s}.yaml").read_text(), _base(c)).keys)
        for s, c in SPACES.items()
    }
    assert {"task.focal_alpha", "task.focal_gamma", "train.lr", "train.weight_decay",
            "model.unfreeze_last_n", "model.head_dropout"} <= keys["focal"]  # fmt: skip
    assert {"metric.margin", "metric.alpha", "metric.proxy_lr_mult", "metric.fusion",
            "metric.gate", "metric.miner"} <= keys["proxy_anchor"]  # fmt: skip
    assert {"distill.temperature", "distill.alpha", "distill.topk", "train.lr"} <= keys["distill"]


def test_conditions_sample_a_parameter_only_when_they_hold():
    sp = load_space(
        "space:\n"
        "  metric.miner: {type: choice, values: [none, multi_similarity]}\n"
        "  metric.miner_epsilon: {type: uniform, low: 0.05, high: 0.3,"
        " when: {metric.miner: multi_similarity}}\n"
        "  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2, when: {task.name: metric}}\n"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    base = RunConfig()  # task.name=classify: train.lr's condition never holds
    for _ in range(30):
        trial = study.ask()
        chosen = sp.suggest(trial, base)
        assert ("metric.miner_epsilon" in chosen) == (chosen["metric.miner"] == "multi_similarity")
        assert "train.lr" not in chosen
        seen.add(chosen["metric.miner"])
        study.tell(trial, 0.0)
    assert seen == {"none", "multi_similarity"}
    metric = C.apply_overrides(base, {"task.name": "metric"})
    assert "train.lr" in sp.suggest(study.ask(), metric)


@pytest.mark.parametrize(
    "text,message",
    [
        ("space:\n  train.lrr: {type: uniform, low: 0, high: 1}\n",
         "unknown config key 'train.lrr'; did you mean 'train.lr'"),
        ("space:\n  train: {type: uniform, low: 0, high: 1}\n", "'train' is a section"),
        ("space:\n  train.lr: {type: gaussian, low: 0, high: 1}\n", "type one of"),
        ("space:\n  train.lr: {type: loguniform, low: 0, high: 1}\n", "loguniform needs low > 0"),
        ("space:\n  train.lr: {type: uniform, low: 2, high: 1}\n", "expected low <= high"),
        ("space:\n  train.lr: {type: uniform, low: 0.1}\n", "needs numeric 'low' and 'high'"),
        ("space:\n  train.lr: {type: uniform, low: 0.1, high: 1, lo: 3}\n",
         "unknown field(s) ['lo']"),
        ("space:\n  model.head: {type: choice, values: [linear, cnn]}\n",
         "'model.head': expected one of"),
        ("space:\n  train.epochs: {type: int, low: 1.5, high: 4}\n", "int needs integer bounds"),
        ("space:\n  metric.dropout: {type: uniform, low: 0.0, high: 1.0}\n",
         "'metric.dropout': expected a value in [0, 1)"),
        ("space:\n  train.lr: {type: uniform, low: 0.1, high: 1, when: {metric.minr: x}}\n",
         "condition: unknown config key 'metric.minr'"),
        ("space:\n  metric.miner_epsilon: {type: uniform, low: 0.1, high: 0.2,"
         " when: {metric.miner: multi_similarity}}\n"
         "  metric.miner: {type: choice, values: [none, multi_similarity]}\n",
         "sampled later; list it first"),
        ("space:\n  train.lr: {type: uniform, low: 0.1, high: 1}\nfixed:\n  train.epoch: 3\n",
         "unknown config key 'train.epoch'"),
        ("space: {}\n", "non-empty 'space:'"),
        ("space:\n  train.lr: {type: uniform, low: 0.1, high: 1}\nsearch: {}\n",
         "unknown section(s) ['search']"),
    ],
)  # fmt: skip
def test_bad_spaces_fail_naming_the_problem(text, message):
    with pytest.raises(ConfigError, match=_escape(message)):
        load_space(text, RunConfig(), "bad.yaml")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_the_tune_job_names_a_missing_space_without_showing_a_credential(tmp_path, capsys):
    """A bad --space fails before Ray starts, exit 2, and a credential that lands in the
    message (here: in the path) is scrubbed like every other job's errors."""
    import jobs.tune

    secret = "s3cr3t-Xq9vLw"
    missing = tmp_path / secret / "space.yaml"
    with pytest.raises(SystemExit) as exit_:
        jobs.tune.main(
            [
                "--config",
                str(ROOT / "jobs/configs/fashion_mnist.yaml"),
                "--space",
                str(missing),
                f"storage.s3_secret_access_key={secret}",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "space.yaml" in err and "***" in err and secret not in err, err
