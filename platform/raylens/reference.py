"""The configuration reference (``docs/config-reference.md``), rendered from the schema.

Every key, type, default and one-line doc comes from the dataclasses themselves
(:class:`raylens.schema.RunConfig` for the jobs, :class:`raylens.serving.settings.ServeConfig`
for the Serve application) through :func:`raylens.config.iter_fields`, so the reference
cannot drift from the code: ``tests/test_reference.py`` fails when the committed file
differs from what this module renders.

    python -m raylens.reference                                      # print to stdout
    python -m raylens.reference --write docs/config-reference.md     # regenerate
    python -m raylens.reference --check docs/config-reference.md     # exit 1 when stale

Pure: no Ray, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raylens import config as C
from raylens.schema import RunConfig
from raylens.serving.settings import ModelEntry, ServeConfig

DEFAULT_PATH = "docs/config-reference.md"
COMMAND = f"python -m raylens.reference --write {DEFAULT_PATH}"

# The sections each job's ``--help`` lists (the ``sections`` each job passes to
# raylens.cli.run_job; tests/test_reference.py checks them against the jobs).
_TRAIN_SECTIONS = (
    "run", "storage", "data", "mix", "model", "task", "train", "metric", "distill", "ray"
)  # fmt: skip
JOB_SECTIONS: dict[str, tuple[str, ...]] = {
    "jobs.prepare": ("run", "storage", "source", "prepare"),
    "jobs.finetune": _TRAIN_SECTIONS,
    "jobs.distill": _TRAIN_SECTIONS,  # an alias of jobs.finetune with task.name=distill
    "jobs.teacher_logits": ("run", "storage", "data", "mix", "distill", "ray"),
    "jobs.embed": ("run", "storage", "data", "model", "embed", "ray"),
    "jobs.tune": (*_TRAIN_SECTIONS, "tune"),
    "jobs.export": ("storage", "export"),
}

# Sections read besides the listed ones when data.dataset is a raw folder or manifest.
RAW_SECTIONS = ("source", "prepare")


# ----------------------------------------------------------------------------- cells


def _plain(text: str) -> str:
    """Plain text escaped for a table cell: ``\\ | < * ` `` and a word-initial ``_``."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")
    text = text.replace("*", "\\*").replace("`", "\\`")
    return re.sub(r"(?<!\w)_", r"\\_", text)  # a word-initial _ could open emphasis


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell (no column breaks, no HTML tags, no emphasis);
    `code spans` are kept, with only their ``|`` escaped."""
    parts = text.replace("\n", " ").split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: all text
        return _plain(text.replace("\n", " "))
    return "".join(
        "`" + part.replace("|", "\\|") + "`" if i % 2 else _plain(part)
        for i, part in enumerate(parts)
    )


def _scalar(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return _scalar(C.to_dict(value))
    return repr(value)


def _code(text: str) -> str:
    """A code span inside a table cell: backslash escapes don't apply there, only ``\\|``."""
    return "`" + text.replace("|", "\\|") + "`"


def _default(value: Any, meta: Mapping[str, Any]) -> str:
    """The default column: the YAML value, or ``<secret>`` for a credential."""
    return _code("<secret>" if meta.get("secret") else _scalar(value))


def _doc(meta: Mapping[str, Any]) -> str:
    """The description column: the field's one-line doc from :func:`raylens.config.opt`."""
    return _md(meta.get("doc", ""))


def _type(tp: Any) -> str:
    """The type column, named as config errors and ``--help`` name it."""
    return _md(C._type_name(tp))


def _table(rows: list[tuple[str, Any, Any, Mapping[str, Any]]]) -> list[str]:
    """A key/type/default/description table of :func:`raylens.config.iter_fields` rows."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, tp, value, meta in rows:
        lines.append(f"| {_code(key)} | {_type(tp)} | {_default(value, meta)} | {_doc(meta)} |")
    return lines


def _sections(cls: type) -> list[tuple[str, str, type]]:
    """``(name, doc, dataclass)`` of every section (a dataclass-typed field) of ``cls``."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, f.metadata.get("doc", ""), hints[f.name])
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    ]


def _anchor(name: str) -> str:
    """The in-page link to the section headed ``### `name` ``."""
    return f"#{name}"


# ----------------------------------------------------------------------------- render


def _jobs_part(run_cls: type, jobs: Mapping[str, Sequence[str]]) -> list[str]:
    """The job config: how keys are set, the job/section table, one table per section."""
    sections = [name for name, _, _ in _sections(run_cls)]
    lines = [
        "## Job configuration",
        "",
        "Every job (`python -m jobs.<job>`, locally or through `ray job submit`) reads one",
        f"`{run_cls.__name__}`: the defaults below, then the `--config` YAML file (local,",
        "`s3://` or `gs://`), then `key.sub=value` overrides on the command line (values are",
        "read as YAML: `3`, `true`, `[a, b]`, `null`). An unknown key is an error naming the",
        "nearest valid key; a value of the wrong type names the key and the expected type; both",
        "exit with status 2 before Ray starts. `jobs.prepare` and the training jobs save the",
        "resolved config (`config.yaml`) with their outputs, `jobs.tune` its base config in",
        "`sweep.json` and the best one in `best_config.yaml`. A default shown as `<secret>`",
        "marks a credential: it is written as null in every saved config and scrubbed from",
        "storage error messages; set it through its environment variable (or a secret store)",
        "rather than in a file.",
        "",
        "### Which job reads which section",
        "",
        "Every job accepts every key; each reads the sections below, and its `--help` lists",
        "only those. A job whose `data.dataset` is a raw folder or manifest rather than a",
        "prepared dataset also reads "
        + " and ".join(f"[`{s}`]({_anchor(s)})" for s in RAW_SECTIONS)
        + " (the source layout and the split fractions).",
        "",
        "| job | sections |",
        "|---|---|",
    ]
    for job, used in jobs.items():
        ordered = [s for s in sections if s in used]
        cells = ", ".join(f"[`{s}`]({_anchor(s)})" for s in ordered)
        lines.append(f"| `python -m {job}` | {cells} |")
    lines.append("")
    for name, doc, section in _sections(run_cls):
        readers = [f"`{job}`" for job, used in jobs.items() if name in used]
        lines += [f"### `{name}`", "", _md(doc)]
        if readers:
            lines += ["", "Read by " + ", ".join(readers) + "."]
        lines += ["", *_table(list(C.iter_fields(section, prefix=name + "."))), ""]
    return lines


def _serve_part(serve_cls: type, entry_cls: type) -> list[str]:
    """The Serve application's ``args``: top-level keys, ``models[]`` entries, sections."""
    nested = _sections(serve_cls)
    inner = {name for name, _, _ in nested}
    top = [row for row in C.iter_fields(serve_cls) if row[0].split(".")[0] not in inner]
    lines = [
        "## Serve application",
        "",
        "The `args` of the application in `serve/config.yaml` (`serve run serve/config.yaml`,",
        f"`serve deploy serve/config.yaml`): `{serve_cls.__module__}.{serve_cls.__name__}`.",
        "Nested keys are written as nested YAML mappings (`limits: {max_inflight: 256}`); they",
        "are not command-line overrides. An unknown or mistyped key fails `serve run` /",
        "`serve deploy` before any replica starts, naming the key. Replica counts, autoscaling,",
        "CPUs/GPUs per replica and `max_ongoing_requests` / `max_queued_requests` are Ray",
        "Serve's own per-deployment options (the `deployments:` list of `serve/config.yaml`),",
        "not these settings.",
        "",
        "### Top-level keys",
        "",
        *_table(top),
        "",
        "### `models[]` entries",
        "",
        "Each item of `models`; set exactly one of `run` or `backbone`.",
        "",
        *_table(list(C.iter_fields(entry_cls, prefix="models[]."))),
        "",
    ]
    for name, doc, section in nested:
        lines += [f"### `{name}` (Serve)", "", _md(doc), ""]
        lines += [*_table(list(C.iter_fields(section, prefix=name + "."))), ""]
    return lines


def render(
    run_cls: type = RunConfig,
    serve_cls: type = ServeConfig,
    entry_cls: type = ModelEntry,
    jobs: Mapping[str, Sequence[str]] = JOB_SECTIONS,
) -> str:
    """The whole reference as Markdown, from the given schemas (the real ones by default)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from platform/raylens/schema.py and platform/raylens/serving/settings.py",
        f"     by `{COMMAND}`. Do not edit by hand. -->",
        "",
        "Generated from the schema: every key, type, default and description below comes from",
        "the config dataclasses. Regenerate with",
        f"`{COMMAND}`;",
        "`tests/test_reference.py` fails when this file is stale. The user guide is",
        "[guide.md](guide.md).",
        "",
        "Contents: [job configuration](#job-configuration)"
        + "".join(f", [`{n}`]({_anchor(n)})" for n, _, _ in _sections(run_cls))
        + "; [Serve application](#serve-application).",
        "",
        *_jobs_part(run_cls, jobs),
        *_serve_part(serve_cls, entry_cls),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- cli


def check(path: str | Path, text: str | None = None) -> str | None:
    """None when ``path`` holds exactly the rendered reference, else why it does not."""
    expected = render() if text is None else text
    p = Path(path)
    if not p.exists():
        return f"{p} does not exist; generate it: {COMMAND}"
    if p.read_text(encoding="utf-8") != expected:
        return (
            f"{p} is out of date with the config schema (platform/raylens/schema.py, "
            f"platform/raylens/serving/settings.py); regenerate it: {COMMAND}"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``--write PATH`` regenerates, ``--check PATH`` exits 1 when stale, else prints."""
    parser = argparse.ArgumentParser(
        prog="python -m raylens.reference",
        description="Render the configuration reference (Markdown) from the config schema.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help=f"write it to PATH (e.g. {DEFAULT_PATH})")
    group.add_argument(
        "--check", metavar="PATH", help="exit 1 when PATH differs from the rendered reference"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        out = Path(args.write)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
        return 0
    if args.check:
        problem = check(args.check, text)
        if problem:
            print(f"python -m raylens.reference: error: {problem}", file=sys.stderr)
            return 1
        print(f"{args.check} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
