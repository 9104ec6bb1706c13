"""The command line every job shares, and the one runner every job goes through.

A job is ``--config FILE`` plus ``key.sub=value`` overrides (``--help`` lists the job's
config keys with defaults and one-line docs), a body that takes the resolved
:class:`RunConfig`, and an optional report that prints where the results went::

    def main(argv=None):
        return run_job(argv, prog=PROG, description=__doc__, sections=[...],
                       main=_body, report=_print)

Exit status, the same for every job (:data:`EXIT_CODES`): 0 done; 2 bad config, usage or
input (:class:`~raylens.config.ConfigError`, an unknown backbone, any ``ValueError``, a
missing file, an output that already exists); 1 storage unreachable or refused
(:class:`~raylens.storage.StorageError`). A job may add codes for its own conditions
(``exit_codes``). Any other exception propagates with its traceback: it is a bug, not
bad input. An error is printed as one line, ``<prog>: error: <message>``, without a
traceback and with every storage credential scrubbed.

Importing this module never imports Ray: :func:`init_ray` imports it when called, so a
job's ``--help`` and its config errors cost no Ray (nor torch) import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

from raylens import config as C
from raylens.schema import RayConfig, RunConfig
from raylens.storage import Storage, StorageError

T = TypeVar("T")
ExitCodes = Mapping[type[BaseException], int] | Callable[[], Mapping[type[BaseException], int]]

# The exception -> exit status map of every job. Looked up along the exception's MRO, so
# the most specific class wins: ConfigError and UnknownBackbone are ValueErrors, and a
# StorageError (an OSError) is not a FileNotFoundError.
EXIT_CODES: dict[type[BaseException], int] = {
    ValueError: 2,  # bad config value or input (ConfigError, UnknownBackbone, ...)
    FileNotFoundError: 2,  # a config file, dataset, run dir or checkpoint that is not there
    FileExistsError: 2,  # an output that is there and may not be replaced
    StorageError: 1,  # storage unreachable or refused (its message is already scrubbed)
}

EXIT_HELP = "exit status: 0 done; 2 bad config, usage or input; 1 storage unreachable or refused"


def parse_job_args(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    sections: list[str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[RunConfig, argparse.Namespace]:
    """Parses a job's command line into a validated :class:`RunConfig` and extra flags.

    A bad key, value or config file exits with status 2 and a one-line error naming it.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in --config YAML or as key=value):\n"
        + C.help_text(RunConfig, sections)
        + f"\n\n{EXIT_HELP}",
    )
    parser.add_argument("--config", help="YAML file (local path, s3:// or gs://)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. data.image_size=64",
    )
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        text = Storage().read_text(args.config) if args.config else None
        cfg = C.load(RunConfig, text, args.overrides)
    except Exception as err:  # the config is not loaded yet: scrub the env's credentials
        code = exit_code(err)
        if code is None:
            raise
        fail(prog, err, code, Storage())
    return cfg, args


def exit_code(
    err: BaseException, extra: Mapping[type[BaseException], int] | None = None
) -> int | None:
    """The exit status for ``err`` (``extra`` first, then :data:`EXIT_CODES`, most specific
    class first), or None when it is not an expected failure and should propagate."""
    table = {**EXIT_CODES, **(extra or {})}
    for cls in type(_unwrap(err)).__mro__:
        if cls in table:
            return table[cls]
    return None


def error_line(prog: str, err: BaseException, storage: Storage) -> str:
    """``<prog>: error: <message>`` on one line, with every storage credential scrubbed."""
    err = _unwrap(err)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        message = err.args[0]  # str(KeyError) is the repr of its key
    else:
        message = str(err)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{prog}: error: {storage.scrub(message or type(err).__name__)}"


def fail(prog: str, err: BaseException, code: int, storage: Storage) -> NoReturn:
    """Prints :func:`error_line` to stderr and exits with ``code`` (no traceback)."""
    print(error_line(prog, err, storage), file=sys.stderr)
    raise SystemExit(code) from None


def run_job(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    sections: list[str],
    main: Callable[[RunConfig, argparse.Namespace], T],
    report: Callable[[T], None] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    exit_codes: ExitCodes | None = None,
) -> T:
    """Runs a job: parses its command line, calls ``main(cfg, flags)``, then ``report`` on
    its result, which it returns. An expected failure (:func:`exit_code`; ``exit_codes``
    adds the job's own) prints one scrubbed line and raises ``SystemExit(code)``.

    Args:
        argv: the arguments after the program name; None: ``sys.argv[1:]``.
        prog: the program name errors and ``--help`` start with (``python -m jobs.x``).
        description: ``--help``'s text, usually the job module's docstring.
        sections: the config sections ``--help`` lists (every key is accepted).
        main: the job body; it starts Ray itself (:func:`init_ray`) after its cheap checks.
        report: prints where the results went; not called when ``main`` failed.
        add_arguments: adds the job's own flags (``flags`` holds them).
        exit_codes: the job's own exception classes -> exit status, or a function
            returning them (called only after a failure, so that the job can name
            classes of the modules its body imports lazily).
    """
    cfg, flags = parse_job_args(
        argv, prog=prog, description=description, sections=sections, add_arguments=add_arguments
    )
    try:
        result = main(cfg, flags)
    except Exception as err:
        code = exit_code(err, exit_codes() if callable(exit_codes) else exit_codes)
        if code is None:
            raise
        fail(prog, err, code, Storage(cfg.storage))
    if report is not None:
        report(result)
    return result


def init_ray(cfg: RayConfig, *, dashboard: bool = False) -> None:
    """Joins the job's Ray cluster or starts a local one (``raylens.runtime``'s
    ``init_ray``), importing Ray only now."""
    from raylens.runtime.launch import init_ray as start

    start(cfg, dashboard=dashboard)


def _unwrap(err: BaseException) -> BaseException:
    # Ray re-raises a remote task's error as a subclass of its class whose text is the
    # remote traceback; the original exception is its ``cause``.
    cause = getattr(err, "cause", None)
    ray_error = any(c.__module__.split(".")[0] == "ray" for c in type(err).__mro__)
    return cause if ray_error and isinstance(cause, BaseException) else err
