"""Command line shared by every job: ``--config FILE`` plus ``key.sub=value`` overrides.

``--help`` lists the job's config keys with defaults and one-line docs. A bad key or
value exits with status 2 and a one-line error naming the key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from raylens import config as C
from raylens.schema import RunConfig
from raylens.storage import Storage


def parse_job_args(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    sections: list[str],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[RunConfig, argparse.Namespace]:
    """Parses a job's command line into a validated :class:`RunConfig` and extra flags."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in --config YAML or as key=value):\n"
        + C.help_text(RunConfig, sections),
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
    except (C.ConfigError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args
