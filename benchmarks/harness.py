"""The harness every benchmark script in this folder shares.

- ``log``: progress lines on stderr (stdout carries the results section only);
- ``machine_line`` / ``header`` / ``heading``: the Command / Date / Machine lines a
  section starts with;
- ``median``, ``summarize``, ``compare``: medians of windows, ratios between variants;
- ``Meter`` / ``measure`` / ``window``: one timed window as items/s *and* CPU seconds per
  item (this process and its descendants), beside the whole machine's busy CPU: on a
  shared machine images/s swings far more between rounds than CPU-s per image does;
- ``wait_quiet``: waits for the machine to be idle before a window;
- ``interleave``: variants run alternately for N rounds (order flipped every round);
- ``write_section`` / ``emit``: print a script's section, and with ``--write`` replace it in
  RESULTS.md (the file's other sections kept); ``dump``: raw results as JSON (``--json``);
- ``scratch``: a temporary folder for one run, removed at exit, Ray shut down with it.

A window is a plain dict (JSON-ready): ``items``, ``seconds``, ``ips`` (items/s),
``cpu_s`` and ``cpu_per_item`` (CPU seconds of this process and its descendants),
``own_cores``, ``machine_cores`` and ``other_cores`` (busy cores: ours, the whole
machine's, the rest); scripts add their own keys. The scripts run as
``.venv/bin/python benchmarks/<script>.py``: this folder is then on ``sys.path`` and
``import harness`` finds this module. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
NAN = float("nan")


def log(msg: str) -> None:
    """A progress line on stderr, time-stamped."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine


def _version(module: str) -> str:
    """The module's ``__version__`` if the script imported it (torch's names its build,
    e.g. ``+cu130``), else the installed distribution's version (no import)."""
    mod = sys.modules.get(module)
    if mod is not None and hasattr(mod, "__version__"):
        return str(mod.__version__)
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """CPU model and count, memory, Python / Ray / torch / pyarrow versions, OS."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or platform.machine() or cpu
    mem_gib = 0.0
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem_gib = int(m.group(1)) / 2**20 if m else 0.0
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))  # what `nproc` says: the CPUs we may use
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu": cpu,
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "ray": _version("ray"),
        "torch": _version("torch"),
        "pyarrow": _version("pyarrow"),
        "os": platform.platform(),
    }


def machine_line(gpu: str | None = None) -> str:
    """``2 CPUs (model), 23.5 GiB RAM, no GPU; Python .., Ray .., torch .., pyarrow ..; OS``."""
    i = machine_info()
    return (
        f"{i['nproc']} CPUs ({i['cpu']}), {i['ram_gib']} GiB RAM, {gpu or 'no GPU'}; "
        f"Python {i['python']}, Ray {i['ray']}, torch {i['torch']}, pyarrow {i['pyarrow']}; "
        f"{i['os']}"
    )


def utc_date() -> str:
    """Now, as ``date -u`` prints it."""
    return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces this run (``argv``: default this process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *args])


def header(
    script: str, argv: Sequence[str] | None = None, *, date: str | None = None, gpu=None
) -> list[str]:
    """The Command / Date / Machine lines under a section's heading."""
    return [
        f"Command: `{command(script, argv)}`  ",
        f"Date: {date or utc_date()}  ",
        f"Machine: {machine_line(gpu)}",
    ]


def heading(section: str, argv: Sequence[str] | None = None, *, date=None, gpu=None) -> list[str]:
    """A section's first lines: its heading ``section``, then ``header``'s lines for the
    script the heading names (``## Title (benchmarks/<script>)``; else this process's)."""
    m = re.search(r"\(benchmarks/([^)\s]+)\)", section)
    script = m.group(1) if m else Path(sys.argv[0]).name
    return [section, "", *header(script, argv, date=date, gpu=gpu), ""]


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder for one run; at exit it is removed, and the Ray session this
    process started, if any, is shut down."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- statistics


def median(xs: Iterable[float]) -> float:
    """The median; NaN for no values."""
    xs = list(xs)
    return statistics.median(xs) if xs else NAN


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN where ``b`` is 0 or either is NaN."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return NAN
    return a / b


def summarize(windows: Sequence[dict]) -> dict:
    """Medians over a variant's windows: ``ips`` (items/s), ``cpu_per_item``, ``seconds``;
    also ``n`` and the slowest / fastest window's items/s."""
    ips = [w["ips"] for w in windows]
    return {
        "n": len(windows),
        "ips": median(ips),
        "ips_min": min(ips, default=NAN),
        "ips_max": max(ips, default=NAN),
        "cpu_per_item": median(w.get("cpu_per_item", NAN) for w in windows),
        "seconds": median(w["seconds"] for w in windows if "seconds" in w),
    }


def compare(base: Sequence[dict], cand: Sequence[dict]) -> dict:
    """Candidate vs baseline windows of the same rounds.

    ``ips``: ratio of median items/s (> 1: the candidate is faster); ``cpu_per_item``:
    ratio of median CPU seconds per item (< 1: the candidate costs less CPU); ``paired``:
    the per-round items/s ratios (round k of each) and ``paired_median`` their median;
    ``best``: fastest window against fastest window.
    """
    b, c = summarize(base), summarize(cand)
    paired = [ratio(y["ips"], x["ips"]) for x, y in zip(base, cand, strict=False)]
    return {
        "ips": ratio(c["ips"], b["ips"]),
        "cpu_per_item": ratio(c["cpu_per_item"], b["cpu_per_item"]),
        "paired": paired,
        "paired_median": median(paired),
        "best": ratio(c["ips_max"], b["ips_max"]),
    }


def rates(windows: Iterable[dict], key: str = "ips", spec: str = ",.0f") -> str:
    """One value per window, comma-separated, for a table cell."""
    return ", ".join(format(w[key], spec) for w in windows)


# ----------------------------------------------------------------------------- measuring


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, ``/proc/stat``); NaN where
    there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return NAN
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have exited
    and been waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class TreeCpu:
    """CPU seconds used by this process and every live descendant (Ray's raylet and
    workers, actors, pool workers, servers) since construction: a thread samples the
    process tree every ``interval`` s, so a process that exits within the window counts up
    to its last sample."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._psutil, self._me = psutil, psutil.Process()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, initial: bool = False) -> None:
        try:
            procs = [self._me, *self._me.children(recursive=True)]
        except self._psutil.Error:
            procs = [self._me]
        for proc in procs:
            try:
                t = proc.cpu_times()
            except self._psutil.Error:
                continue
            cpu = t.user + t.system
            # A process first seen after the start began within the window: all of its
            # CPU time is the window's.
            self._first.setdefault(proc.pid, cpu if initial else 0.0)
            self._last[proc.pid] = cpu

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def stop(self) -> float:
        """Stops sampling; the CPU seconds used since construction."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(self._last[p] - self._first[p] for p in self._last)


def window(items: float, seconds: float, cpu_s: float = NAN, machine_s: float = NAN) -> dict:
    """A measurement of ``items`` done in ``seconds`` using ``cpu_s`` CPU seconds (ours)
    while the whole machine was busy for ``machine_s`` CPU seconds."""
    own = ratio(cpu_s, seconds)
    machine = ratio(machine_s, seconds)
    return {
        "items": items,
        "seconds": seconds,
        "ips": ratio(items, seconds),
        "cpu_s": cpu_s,
        "cpu_per_item": ratio(cpu_s, items),
        "own_cores": own,
        "machine_cores": machine,
        "other_cores": NAN if math.isnan(machine + own) else max(0.0, machine - own),
    }


class Meter:
    """Measures one window from construction to ``stop(items)``: wall time, CPU time of
    this process and its descendants, the machine's busy CPU.

    ``tree``: sample live descendants with psutil (``TreeCpu``): for work done by other
    processes that outlive the window (Ray workers, pools, servers). Without it, this
    process's CPU time plus that of children it waited for (``getrusage``), no thread.
    """

    def __init__(self, tree: bool = False):
        self._tree = TreeCpu() if tree else None
        self._cpu0 = process_cpu_s()
        self._busy0 = machine_busy_s()
        self._t0 = time.perf_counter()

    def stop(self, items: float) -> dict:
        seconds = time.perf_counter() - self._t0
        busy = machine_busy_s() - self._busy0
        cpu = self._tree.stop() if self._tree else process_cpu_s() - self._cpu0
        return window(items, seconds, cpu, busy)


def measure(fn: Callable[[], object], tree: bool = False) -> dict:
    """Runs ``fn`` in a ``Meter`` window.

    ``fn`` returns the number of items it did, or a dict: with ``ips`` it is a window the
    function measured itself (returned as is); else it holds ``items`` and any keys of its
    own, which are kept beside the measured ones.
    """
    meter = Meter(tree)
    out = fn()
    if isinstance(out, dict):
        return out if "ips" in out else {**meter.stop(out["items"]), **out}
    return meter.stop(float(out))


def wait_quiet(max_cores: float = 0.3, timeout: float = 60.0) -> float:
    """Waits until the machine's busy CPU over 1 s is <= ``max_cores`` (at most ``timeout``
    s); returns the last value (busy cores)."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        b0 = machine_busy_s()
        time.sleep(1.0)
        load = machine_busy_s() - b0
        if math.isnan(load) or load <= max_cores or time.monotonic() >= deadline:
            if waited:
                log(f"machine load now {load:.2f} cores")
            return load
        if not waited:
            log(f"machine busy ({load:.2f} cores); waiting up to {timeout:.0f} s for it to settle")
        waited = True


def alternate(names: Sequence[str], rnd: int) -> list[str]:
    """The default round order: ``names`` in even rounds, reversed in odd ones."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def interleave(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: bool = False,
    order: Callable[[int], Sequence[str]] | None = None,
    quiet: tuple[float, float] | None = None,
    tree: bool = False,
    unit: str = "items",
    check: Callable[[str, dict], None] | None = None,
    verbose: bool = True,
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Runs the ``variants`` alternately for ``rounds`` rounds; returns ``(runs, warm)``:
    each variant's windows in round order, and its untimed warm-up window (``warmup``: one
    round of every variant first, in the order of ``variants``; else ``warm`` is empty).

    ``order(rnd)``: the variants of round ``rnd`` in the order to run (default: forward in
    even rounds, reversed in odd ones; a variant left out sits that round out).
    ``quiet=(max_cores, timeout)``: ``wait_quiet`` before every window (its result in the
    window's ``idle_before``). Each call is measured as ``measure(fn, tree)`` describes;
    ``check(name, window)`` may assert on a window's output (warm-up included). With
    ``verbose``, a log line per window gives items/s and CPU-ms per item.
    """
    names = list(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    warm: dict[str, dict] = {}
    plan = [(-1, names)] if warmup else []
    plan += [(rnd, list((order or (lambda r: alternate(names, r)))(rnd))) for rnd in range(rounds)]
    for rnd, todo in plan:
        for name in todo:
            idle = wait_quiet(*quiet) if quiet else NAN
            w = measure(variants[name], tree)
            w.setdefault("idle_before", idle)
            w.setdefault("round", rnd)
            if check:
                check(name, w)
            if rnd < 0:
                warm[name] = w
            else:
                runs[name].append(w)
            label = "warm-up" if rnd < 0 else f"round {rnd}"
            if verbose:
                log(
                    f"{label} {name}: {w['ips']:,.1f} {unit}/s, "
                    f"{1000 * w.get('cpu_per_item', NAN):.3g} CPU-ms per {unit.rstrip('s')} "
                    f"({w.get('seconds', NAN):.2f} s, "
                    f"other load {w.get('other_cores', NAN):.2f} cores)"
                )
    return runs, warm


# ----------------------------------------------------------------------------- RESULTS.md


def add_output_args(parser, *, write: bool = True, out: bool = False) -> None:
    """A script's output flags: ``--write`` (replace its section of RESULTS.md; with
    ``out``, of ``--out``), and with ``out`` also ``--out``, ``--json`` (raw results, see
    ``dump``) and ``--note`` (extra notes for the section)."""
    if write:
        where = "--out" if out else "RESULTS.md"
        parser.add_argument(
            "--write", action="store_true", help=f"replace this script's section of {where}"
        )
    if out:
        parser.add_argument("--out", default=str(RESULTS))
        parser.add_argument("--json", help="also write raw results as JSON here")
        parser.add_argument("--note", action="append", default=[], help="extra note for RESULTS.md")


def write_section(path: Path | str, section: str, text: str) -> None:
    """Replaces the section whose heading line is ``section`` in ``path`` (appends it if
    absent), up to the next ``## `` heading; the other sections are kept."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    text = text.strip("\n") + "\n"
    head = re.search(rf"^{re.escape(section)}[ \t]*$", old, flags=re.M)
    if head is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        start, after = head.start(), head.end()
        nxt = re.search(r"^## ", old[after:], flags=re.M)
        new = old[:start] + text + ("\n" + old[after + nxt.start() :] if nxt else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def emit(section: str, text: str | Sequence[str], write: bool, path: Path | str = RESULTS):
    """Prints a script's section (``text``: the text or its lines, starting with the
    heading ``section``); with ``write`` (the script's ``--write``) replaces it in ``path``."""
    text = text if isinstance(text, str) else "\n".join(text)
    text = text.strip("\n") + "\n"
    print(text, flush=True)
    if write:
        write_section(path, section, text)
        log(f"wrote {path}")


def dump(path: Path | str | None, data: dict) -> None:
    """Writes ``data`` as JSON to ``path`` (a script's ``--json``; nothing without one)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1, default=str))
        log(f"wrote {path}")
