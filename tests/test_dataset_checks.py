"""data.dataset is checked before Ray starts: a mistyped path, a folder that is neither
prepared nor a raw source the job reads, and a missing or damaged dataset.json fail in
seconds with a message naming the path and what is wrong, for every job that reads one."""

from __future__ import annotations

import importlib
import time

import pytest
import ray
from raylens.data.prepare import CARD, check_dataset, load_card
from raylens.schema import SourceConfig
from raylens.storage import Storage, join

from tests.repo import REPO, run_job
from tests.sourcegen import prepare_quiet, write_folder, write_idx

FM = str(REPO / "jobs/configs/fashion_mnist.yaml")  # source.kind: idx, the shipped default
DISTILL = str(REPO / "jobs/configs/distill_fashion_mnist.yaml")
EMBED = str(REPO / "jobs/configs/embed_fashion_mnist.yaml")
SPACE = str(REPO / "tune_spaces/classify.yaml")

# (job, its arguments besides data.dataset): every job that reads data.dataset
JOBS = {
    "finetune": ["--config", FM, "run.name=typo"],
    "distill": ["--config", DISTILL, "run.name=typo"],
    "tune": ["--config", FM, "--space", SPACE, "run.name=typo"],
    "teacher_logits": ["--config", DISTILL],
    "embed": ["--config", EMBED, "embed.model=vgg_s16"],
}
PREPARED_ONLY = {"distill", "teacher_logits"}  # stored distillation and its teacher pass


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """The jobs' own imports (torch for the task registry) happen once, outside the timing."""
    for job in JOBS:
        importlib.import_module(f"jobs.{job}")
    importlib.import_module("raylens.tasks")


def _fails_before_ray(job: str, dataset: str, monkeypatch, capsys, *extra: str) -> str:
    """Runs ``jobs.<job>`` in-process with ``data.dataset=dataset``; asserts it exits 2 within
    3 s without starting Ray and returns its one error line."""
    module = importlib.import_module(f"jobs.{job}")
    started = []
    runner = importlib.import_module("jobs.finetune" if job == "distill" else f"jobs.{job}")
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: started.append(1))
    # An earlier test in the same pytest process may have left Ray up: compare, and catch any
    # direct ray.init as well as the job's own init_ray.
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray.init"))
    was_up = ray.is_initialized()
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        module.main([*JOBS[job], f"data.dataset={dataset}", *extra])
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert not started and ray.is_initialized() == was_up
    assert seconds < 3, f"{job} took {seconds:.1f} s to refuse {dataset!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m jobs.{job}: error: "), err
    return err


@pytest.mark.parametrize("job", JOBS)
def test_a_mistyped_dataset_fails_before_ray_naming_it(job, tmp_path, monkeypatch, capsys):
    typo = str(tmp_path / "data" / "fashion-mnst")
    err = _fails_before_ray(job, typo, monkeypatch, capsys)
    assert f"config key 'data.dataset': no prepared dataset ({CARD}) at {typo!r}" in err
    if job in PREPARED_ONLY:
        assert err.endswith("over a prepared dataset (run jobs.prepare)") or err.endswith(
            "a prepared dataset's rows (run jobs.prepare)"
        ), err
    else:
        assert err.endswith("and nothing else is there (no such file or folder)"), err
    assert "IDX" not in err and "train-images" not in err  # source.kind: idx no longer leaks


@pytest.mark.parametrize("job", ["finetune", "tune"])
def test_a_folder_without_a_card_says_what_the_raw_source_lacks(job, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    # the shipped config's source.kind=idx: training reads IDX only through jobs.prepare
    err = _fails_before_ray(job, str(folder), monkeypatch, capsys)
    assert (
        f"no prepared dataset ({CARD}) at {str(folder)!r}, nor is it a raw idx source "
        "(source.kind=idx): idx files are read only by jobs.prepare; this job reads a raw "
        "folder / manifest / yolo source"
    ) in err, err
    err = _fails_before_ray(job, str(folder), monkeypatch, capsys, "source.kind=auto")
    assert err.endswith(
        f"at {str(folder)!r}, nor is it a raw folder source: no labelled images "
        "(left out: {'not_an_image_suffix': 1})"
    ), err


def test_embed_names_the_files_a_raw_idx_source_lacks(tmp_path, monkeypatch, capsys):
    storage, raw = Storage(), str(tmp_path / "idx")
    write_idx(storage, raw)
    storage.delete(join(raw, "t10k-labels-idx1-ubyte.gz"))
    err = _fails_before_ray("embed", raw, monkeypatch, capsys, "source.kind=idx")
    assert err.endswith(
        f"no prepared dataset ({CARD}) at {raw!r}, nor is it a raw idx source (source.kind=idx): "
        "missing t10k-labels-idx1-ubyte[.gz]"
    ), err


DAMAGED = [
    (b"", "is empty"),
    (b"   \n", "is empty"),
    (b'{"format": "raylens.dataset/1", "classes": [', "is not valid JSON (at line 1, column 45)"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[1, 2]", "is not a JSON object"),
    (b'{"classes": []}', "is not a raylens dataset card: no 'format'; no 'task'; no 'splits'"),
]


@pytest.mark.parametrize("data, what", DAMAGED)
@pytest.mark.parametrize("job", JOBS)
def test_a_damaged_card_is_named_with_what_is_wrong(job, data, what, tmp_path, monkeypatch, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / CARD).write_bytes(data)
    err = _fails_before_ray(job, str(tmp_path / "ds"), monkeypatch, capsys)
    card = str(tmp_path / "ds" / CARD)
    assert f"error: dataset card {card!r} {what}" in err, err
    assert err.endswith("re-run jobs.prepare (it rewrites a damaged card)"), err
    assert "Expecting value" not in err and "char " not in err  # no JSON decoder internals


def test_a_card_missing_a_split_or_of_another_format_is_named(tmp_path, prepared):
    import json

    storage, ds = Storage(), prepared
    card = load_card(storage, ds)
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = {**card, "format": "raylens.dataset/0", "splits": {"train": card["splits"]["train"]}}
    (bad / CARD).write_text(json.dumps(broken))
    with pytest.raises(ValueError) as err:
        check_dataset(str(bad), SourceConfig(), storage)
    assert (
        "format 'raylens.dataset/0', expected 'raylens.dataset/1'; no split 'val'; no split 'test'"
    ) in str(err.value)


def test_shards_without_a_card_are_an_unfinished_prepare(tmp_path, prepared, monkeypatch, capsys):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(prepared, half)
    (half / CARD).unlink()
    err = _fails_before_ray("finetune", str(half), monkeypatch, capsys)
    assert err.endswith(
        f"no prepared dataset ({CARD}) at {str(half)!r}, only shards: an unfinished "
        "jobs.prepare (the card is written last); re-run it"
    ), err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=4)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    return str(root / "ds")


def test_good_datasets_pass_the_check(prepared, tmp_path):
    storage = Storage()
    card = check_dataset(prepared, SourceConfig(kind="idx"), storage)  # source.* is not read
    assert card == load_card(storage, prepared) and card["total"] == 12
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=2)
    assert check_dataset(raw, SourceConfig(), storage) is None
    idx = str(tmp_path / "idx")
    write_idx(storage, idx)
    assert check_dataset(idx, SourceConfig(kind="idx"), storage) is None
    with pytest.raises(ValueError, match="idx files are read only by jobs.prepare"):
        check_dataset(idx, SourceConfig(), storage, raw_kinds=("folder", "manifest"))


def test_readers_of_a_card_name_a_damaged_one(prepared, tmp_path):
    """Library callers (a Tune trial, a notebook) get the same message as the jobs."""
    import shutil

    from raylens.runtime.ingest import read_prepared

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    (ds / CARD).write_text('{"format": ')
    was_up = ray.is_initialized()
    with pytest.raises(ValueError, match=r"dataset card '.*/ds/dataset.json' is not valid JSON"):
        read_prepared(str(ds), "train", Storage())
    assert ray.is_initialized() == was_up


def test_prepare_rewrites_a_damaged_card(tmp_path):
    storage, raw, out = Storage(), str(tmp_path / "raw"), tmp_path / "ds"
    write_folder(storage, raw, per_class=4)
    good = prepare_quiet(storage, raw, str(out))
    (out / CARD).write_text("{")
    assert load_card(storage, str(out), strict=False) is None
    card = prepare_quiet(storage, raw, str(out))
    assert not card.get("up_to_date") and card["fingerprint"] == good["fingerprint"]
    assert load_card(storage, str(out)) == card


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_cli_fails_fast_on_a_mistyped_dataset(tmp_path):
    """As a user runs it: ~40 s of Ray start-up before, now the interpreter's start-up."""
    t0 = time.monotonic()
    res = run_job("finetune", "--config", FM, "run.name=x", f"data.dataset={tmp_path}/fm-typo")
    seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == (
        f"python -m jobs.finetune: error: config key 'data.dataset': no prepared dataset "
        f"({CARD}) at '{tmp_path}/fm-typo', and nothing else is there (no such file or folder)"
    )
    assert seconds < 30, seconds
    assert "Started a local Ray instance" not in res.stdout + res.stderr
