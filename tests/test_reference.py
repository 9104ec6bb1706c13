"""docs/config-reference.md is generated from the schema and kept in step with it (no Ray)."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest
from raylens import cli
from raylens import config as C
from raylens import reference as R
from raylens.config import opt
from raylens.schema import RunConfig, TrainConfig
from raylens.serving.settings import ModelEntry, ServeConfig

from tests.repo import REPO

DOC = REPO / R.DEFAULT_PATH


def _fixed(text: str) -> str:
    return f"`{text}`"


def test_committed_reference_is_the_generated_one():
    assert DOC.exists(), f"missing {DOC}; run: {R.COMMAND}"
    assert DOC.read_text(encoding="utf-8") == R.render(), f"{DOC} is stale; run: {R.COMMAND}"
    assert R.check(DOC) is None


def test_every_key_of_every_schema_is_in_the_reference():
    text = DOC.read_text(encoding="utf-8")
    job_keys = C.all_keys(RunConfig)
    serve_keys = C.all_keys(ServeConfig)
    entry_keys = [f"models[].{k}" for k in C.all_keys(ModelEntry)]
    missing = [k for k in job_keys + serve_keys + entry_keys if _fixed(k) not in text]
    assert not missing, f"keys missing from {DOC}: {missing}"
    # every leaf row carries its type, default and doc from the schema
    for key, tp, default, meta in C.iter_fields(RunConfig):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert R._type(tp) in row and R._md(meta["doc"]) in row, row
        assert ("`<secret>`" in row) == bool(meta.get("secret")), row
        if not meta.get("secret"):
            assert R._default(default, meta) in row, row


def test_secrets_are_marked_not_shown():
    secret = dataclasses.make_dataclass(
        "StorageX", [("s3_secret_access_key", str, opt("hunter2", "key", secret=True))]
    )
    runx = dataclasses.make_dataclass("RunX", [("storage", secret, opt(secret, "creds"))])
    text = R.render(run_cls=runx, jobs={"jobs.x": ("storage",)})
    assert "`storage.s3_secret_access_key`" in text and "`<secret>`" in text
    assert "hunter2" not in text


def test_a_schema_change_changes_the_reference():
    # a changed default and a new key in one section, through a modified copy of the schema
    train_x = dataclasses.make_dataclass(
        "TrainConfig",
        [
            ("epochs", int, opt(11, "Training epochs.")),
            ("new_knob", float, opt(0.25, "A key added to the schema.")),
        ],
        bases=(TrainConfig,),
    )
    run_x = dataclasses.make_dataclass(
        "RunConfig", [("train", train_x, opt(train_x, "Optimization loop."))], bases=(RunConfig,)
    )
    changed = R.render(run_cls=run_x)
    assert changed != R.render()
    assert "| `train.epochs` | int | `11` |" in changed
    assert "| `train.new_knob` | float | `0.25` | A key added to the schema. |" in changed
    # a job reading another section changes the job table
    jobs = {**R.JOB_SECTIONS, "jobs.embed": (*R.JOB_SECTIONS["jobs.embed"], "tune")}
    assert R.render(jobs=jobs) != R.render()


def test_check_fails_on_a_stale_or_missing_file_naming_it(tmp_path, capsys):
    good = tmp_path / "docs" / "config-reference.md"
    assert R.main(["--write", str(good)]) == 0
    assert R.main(["--check", str(good)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(good.read_text().replace("`train.epochs` | int | `10`", "x"))
    capsys.readouterr()
    assert R.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert str(stale) in err and "out of date" in err and R.COMMAND in err
    missing = tmp_path / "nope.md"
    assert R.main(["--check", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_module_entry_point_and_no_ray_import():
    code = (
        "import sys, runpy; sys.argv = ['raylens.reference', '--check', sys.argv[1]]\n"
        "try:\n    runpy.run_module('raylens.reference', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imports Ray/torch'\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(DOC)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr


class _Captured(Exception):
    pass


@pytest.mark.parametrize("job", sorted(R.JOB_SECTIONS))
def test_job_sections_are_the_ones_each_job_lists(job, monkeypatch):
    """JOB_SECTIONS equals what each job passes to the runner, which parses the command
    line (raylens.cli.parse_job_args) before it calls anything of the job's: nothing starts."""
    seen: dict = {}

    def capture(argv, *, sections, **kwargs):
        seen["sections"] = tuple(sections)
        raise _Captured

    module = importlib.import_module(job)
    monkeypatch.setattr(cli, "parse_job_args", capture)
    with pytest.raises(_Captured):
        module.main([])
    assert seen["sections"] == R.JOB_SECTIONS[job]
