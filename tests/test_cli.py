"""The job runner every job goes through (raylens.cli.run_job): one exception -> exit status
map, one scrubbed line on stderr, no traceback; --help lists the job's keys. No Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from raylens import cli
from raylens.config import ConfigError
from raylens.storage import StorageError

from tests.repo import REPO

PROG = "python -m jobs.x"
SECRET = "s3cr3t-Zq7wK"


def run(*overrides: str, body, report=None, exit_codes=None, add_arguments=None):
    return cli.run_job(
        list(overrides),
        prog=PROG,
        description="A test job.",
        sections=["storage", "export"],
        main=body,
        report=report,
        exit_codes=exit_codes,
        add_arguments=add_arguments,
    )


def raising(err: BaseException):
    def body(cfg, flags):
        raise err

    return body


class UnknownBackbone(ValueError):  # as raylens.models.base's: a ValueError
    pass


@pytest.mark.parametrize(
    "err, code",
    [
        (ConfigError(f"config key 'export.run': {SECRET} is not a run dir"), 2),
        (UnknownBackbone(f"unknown backbone {SECRET!r}; registered: vgg_s16, ..."), 2),
        (ValueError(f"run dir 's3://b/{SECRET}' is a metric-learning run"), 2),
        (FileNotFoundError(f"no labels.json in 's3://b/{SECRET}'"), 2),
        (FileExistsError(f"sweep 's3://b/{SECRET}' exists; pass --resume"), 2),
        (StorageError(f"s3://b/{SECRET}: connection refused"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_each_expected_failure_is_one_scrubbed_line_and_its_exit_status(err, code, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(f"storage.s3_secret_access_key={SECRET}", body=raising(err))
    assert exit_.value.code == code
    out, errout = capsys.readouterr()
    assert out == ""
    assert errout.startswith(f"{PROG}: error: ") and errout.endswith("\n"), errout
    assert len(errout.splitlines()) == 1 and "Traceback" not in errout, errout
    assert SECRET not in errout and "***" in errout, errout
    assert str(err).replace(SECRET, "***") in errout  # the message itself, nothing dropped


def test_credentials_from_the_environment_are_scrubbed_too(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-env-key-42")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-42")
    with pytest.raises(SystemExit) as exit_:
        run(body=raising(StorageError("key AKIA-env-key-42 / env-secret-42 refused")))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "AKIA-env-key-42" not in err and "env-secret-42" not in err
    assert err == f"{PROG}: error: key *** / *** refused\n"


def test_a_multi_line_message_is_printed_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(body=raising(ValueError("bad dataset:\n  row 3: no image\n  row 9: no label\n")))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"{PROG}: error: bad dataset: row 3: no image row 9: no label\n"
    )


def test_a_remote_error_is_shown_as_its_cause_not_its_traceback(capsys):
    """Ray re-raises a task's ValueError as a subclass of ValueError whose text is the
    remote traceback; the message shown is the original's (a stand-in class: no Ray)."""
    wrapped = type("RayTaskError(ValueError)", (ValueError,), {"__module__": "ray.exceptions"})
    err = wrapped("ray::decode() (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):\n...")
    err.cause = ValueError("image 'a.png' is truncated")
    with pytest.raises(SystemExit) as exit_:
        run(body=raising(err))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"{PROG}: error: image 'a.png' is truncated\n"


def test_anything_else_propagates_unchanged(capsys):
    bug = RuntimeError("a bug, not bad input")
    with pytest.raises(RuntimeError) as raised:
        run(body=raising(bug))
    assert raised.value is bug and capsys.readouterr().err == ""
    with pytest.raises(KeyError):  # not input unless a job says so
        run(body=raising(KeyError("top1")))
    with pytest.raises(KeyboardInterrupt):
        run(body=raising(KeyboardInterrupt()))


class NotCommitted(RuntimeError):
    pass


class Superseded(ValueError):
    pass


def test_a_job_adds_its_own_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(body=raising(NotCommitted("a later run took the output")), exit_codes={NotCommitted: 1})
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"{PROG}: error: a later run took the output\n"
    # the most specific class wins, a job's own before the common table's
    with pytest.raises(SystemExit) as exit_:
        run(body=raising(Superseded("x")), exit_codes={Superseded: 1})
    assert exit_.value.code == 1
    with pytest.raises(SystemExit) as exit_:  # a KeyError's message without its quotes
        run(body=raising(KeyError("no targets for sample 'a'")), exit_codes=lambda: {KeyError: 2})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("error: no targets for sample 'a'\n")
    assert cli.exit_code(NotCommitted()) is None and cli.exit_code(Superseded()) == 2


def test_the_body_gets_the_config_and_flags_and_report_prints_the_result(capsys):
    seen = []

    def body(cfg, flags):
        seen.append((cfg.export.images, cfg.export.run, flags.check))
        return {"rows": 3}

    def flag(parser):
        parser.add_argument("--check", action="store_true")

    out = run(
        "export.images=5",
        "export.run=runs/x",
        "--check",
        body=body,
        report=lambda r: print(f"rows: {r['rows']}"),
        add_arguments=flag,
    )
    assert out == {"rows": 3} and seen == [(5, "runs/x", True)]
    assert capsys.readouterr().out == "rows: 3\n"
    reported = []
    with pytest.raises(SystemExit):
        run(body=raising(ValueError("no")), report=reported.append)
    assert reported == []  # no report of a failed job


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export.imagse=3"], "unknown config key 'export.imagse'; did you mean 'export.images'?"),
        (["export.images=0"], "config key 'export.images': expected a count >= 1, got 0"),
        (["--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
    ],
)
def test_a_bad_command_line_exits_2_before_the_body_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(*argv, body=raising(AssertionError("the body ran")))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"{PROG}: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_help_lists_the_jobs_keys_with_defaults_and_docs_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--help", body=raising(AssertionError("the body ran")))
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG}") and "A test job." in out
    assert "export.images = 32" in out and "export.opset = 18" in out
    assert "Real images of the run's dataset (test split, then val) to verify on." in out
    assert "storage.s3_endpoint_url" in out
    assert "train.lr" not in out  # only the sections the job reads
    assert cli.EXIT_HELP in out


def test_no_job_imports_ray_or_torch_until_it_runs():
    """--help and config errors cost no Ray/torch import; the jobs import them lazily."""
    jobs = ["prepare", "finetune", "distill", "tune", "embed", "teacher_logits", "export"]
    code = (
        "import sys, raylens.cli\n"
        + "".join(f"import jobs.{j}\n" for j in jobs)
        + "bad = [m for m in ('ray', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "jobs.export", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "export.run = ''" in help_.stdout, help_.stderr


def test_every_job_imports_what_it_imports_lazily():
    """A job imports its library modules inside its body (so that --help costs no Ray):
    each of those imports must still resolve after modules move (checked in a fresh
    interpreter; it imports Ray and torch but starts nothing)."""
    code = """
import ast, importlib, pathlib
bad = []
for path in sorted(pathlib.Path("jobs").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            module = importlib.import_module(node.module)
            for a in node.names:
                if not hasattr(module, a.name):
                    try:  # a submodule
                        importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        bad.append(f"{path}: {node.module}.{a.name}")
assert not bad, bad
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
