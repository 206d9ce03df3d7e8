"""The scripts in examples/ and benchmarks/ run, and say what they claim (smoke runs: --quick for benchmarks)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 300) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_example_undo_retry():
    out = run("examples/undo_retry.py")
    retries = int(re.search(r"60 steps, (\d+) retries", out).group(1))
    assert retries >= 1  # the lr is too high: some steps are undone and retried
    assert re.search(r"trial: validation loss [\d.]+ -> [\d.]+ \((kept|rolled back)\)", out)


def test_example_spike_guard(tmp_path):
    csv = tmp_path / "log.csv"
    out = run("examples/spike_guard.py", "--csv", str(csv))
    assert "plain:      final loss nan" in out  # the NaN batch kills plain training
    assert re.search(r"iteration 150: rolled_back", out) and re.search(r"iteration 220: skipped", out)
    final = float(re.search(r"SpikeGuard: final loss ([\d.]+)", out).group(1))
    assert final < 0.2
    assert csv.read_text().startswith("iteration,")


def test_example_line_search():
    out = run("examples/line_search.py")
    finals = [float(x) for x in re.findall(r"final loss ([\d.]+)", out)]
    assert len(finals) == 4 and all(f < 0.3 for f in finals), out


@pytest.mark.slow
def test_bench_core_quick(tmp_path):
    path = tmp_path / "core.json"
    out = run("benchmarks/bench_core.py", "--quick", "--json", str(path))
    assert "## Snapshot / restore" in out and "## Targets" in out
    res = json.loads(path.read_text())
    assert res["core"] and res["training"], res.keys()


@pytest.mark.slow
def test_bench_policies_quick(tmp_path):
    path = tmp_path / "policies.json"
    out = run("benchmarks/bench_policies.py", "--quick", "--json", str(path))
    assert "## 1. Fault injection" in out and "## 3. Overhead" in out
    res = json.loads(path.read_text())
    assert {"faults", "linesearch", "overhead", "verdicts"} <= res.keys()
    assert len(res["settings"]["seeds"]) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_overlap.py", "bench_delta.py", "bench_disk.py"])
def test_tier_benchmarks_quick(tmp_path, script):
    path = tmp_path / "out.json"
    out = run(f"benchmarks/{script}", "--quick", "--json", str(path))
    assert out.startswith("# torchrewind") and "|---|" in out
    res = json.loads(path.read_text())
    assert res
    if script == "bench_disk.py":
        assert res["exact"] is True
