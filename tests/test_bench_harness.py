"""The benchmark harness's arithmetic: windows, medians, ratios, interleaved rounds, and the
RESULTS.md section replacement. Pure: no Ray, no servers, no timing assertions."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
_SPEC = importlib.util.spec_from_file_location("bench_harness", _PATH)
harness = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(harness)


def test_window_rates_and_cores():
    w = harness.window(items=200, seconds=4.0, cpu_s=6.0, machine_s=7.0)
    assert w["ips"] == 50.0
    assert w["cpu_per_item"] == 0.03
    assert w["own_cores"] == 1.5
    assert w["machine_cores"] == 1.75
    assert w["other_cores"] == 0.25
    # The machine's count can lag ours (sampling): others never go negative.
    assert harness.window(10, 1.0, cpu_s=2.0, machine_s=1.5)["other_cores"] == 0.0
    assert math.isnan(harness.window(10, 1.0)["cpu_per_item"])


def test_median_and_ratio_edge_cases():
    assert harness.median([3, 1, 2]) == 2
    assert harness.median([4, 1, 2, 3]) == 2.5
    assert math.isnan(harness.median([]))
    assert harness.ratio(3, 2) == 1.5
    assert math.isnan(harness.ratio(1, 0))
    assert math.isnan(harness.ratio(float("nan"), 2))


def _windows(ips, cpu_per_item):
    return [harness.window(x, 1.0, cpu_s=x * c) for x, c in zip(ips, cpu_per_item, strict=True)]


def test_summarize_and_compare():
    base = _windows([100, 80, 120], [0.010, 0.012, 0.011])
    cand = _windows([150, 160, 90], [0.005, 0.006, 0.004])
    s = harness.summarize(base)
    assert s["n"] == 3 and s["ips"] == 100 and s["ips_min"] == 80 and s["ips_max"] == 120
    assert s["cpu_per_item"] == pytest.approx(0.011)
    assert s["seconds"] == 1.0
    c = harness.compare(base, cand)
    assert c["ips"] == pytest.approx(150 / 100)
    assert c["cpu_per_item"] == pytest.approx(0.005 / 0.011)
    assert c["paired"] == pytest.approx([1.5, 2.0, 0.75])
    assert c["paired_median"] == pytest.approx(1.5)
    assert c["best"] == pytest.approx(160 / 120)
    assert harness.rates(base) == "100, 80, 120"


def test_interleave_alternates_and_measures(monkeypatch):
    monkeypatch.setattr(harness, "log", lambda msg: None)
    calls = []

    def variant(name, items):
        def run():
            calls.append(name)
            return items

        return run

    def self_timed():
        calls.append("c")
        return {"ips": 7.0, "mine": 1}

    runs, warm = harness.interleave(
        {"a": variant("a", 10), "b": variant("b", {"items": 5, "extra": "x"}), "c": self_timed},
        3,
        warmup=True,
    )
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert set(warm) == {"a", "b", "c"} and warm["a"]["round"] == -1
    assert [w["round"] for w in runs["b"]] == [0, 1, 2]
    assert all(w["items"] == 10 and w["ips"] > 0 and "cpu_per_item" in w for w in runs["a"])
    assert runs["b"][0]["extra"] == "x" and runs["b"][0]["items"] == 5
    assert runs["c"][0]["ips"] == 7.0 and runs["c"][0]["mine"] == 1  # taken as measured

    calls.clear()
    runs, warm = harness.interleave(
        {"a": variant("a", 1), "b": variant("b", 1)}, 2, order=lambda rnd: ["b"] if rnd else "ab"
    )
    assert calls == ["a", "b", "b"] and warm == {}
    assert len(runs["a"]) == 1 and len(runs["b"]) == 2


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Benchmarks\n\n## A (benchmarks/a.py)\n\nold a\n\n"
        "## A (benchmarks/a.py): notes\n\nkept\n\n## B\n\nb\n"
    )
    harness.write_section(path, "## A (benchmarks/a.py)", "## A (benchmarks/a.py)\n\nnew a")
    assert path.read_text() == (
        "# Benchmarks\n\n## A (benchmarks/a.py)\n\nnew a\n\n"
        "## A (benchmarks/a.py): notes\n\nkept\n\n## B\n\nb\n"
    )
    harness.write_section(path, "## C", "## C\n\nc\n\n")
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")


def test_heading_names_the_script():
    lines = harness.heading("## X (benchmarks/x.py)", ["--reps", "1"], date="D")
    assert lines[0] == "## X (benchmarks/x.py)" and lines[1] == "" and lines[-1] == ""
    assert lines[2] == "Command: `.venv/bin/python benchmarks/x.py --reps 1`  "
    assert lines[3] == "Date: D  "
    assert lines[4].startswith("Machine: ") and "no GPU" in lines[4]
