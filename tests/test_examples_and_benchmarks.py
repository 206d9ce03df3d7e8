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


def test_example_lightning_spike_guard(tmp_path):
    pytest.importorskip("lightning")
    csv = tmp_path / "log.csv"
    out = run("examples/lightning_spike_guard.py", "--csv", str(csv))
    assert "plain Lightning:       final loss nan" in out  # the NaN batch kills plain Lightning training
    assert re.search(r"iteration 150: rolled_back", out) and re.search(r"iteration 220: skipped", out)
    final = float(re.search(r"RewindCallback\(spike\): final loss ([\d.]+)", out).group(1))
    assert final < 0.2
    assert csv.read_text().startswith("iteration,")


def test_example_line_search():
    out = run("examples/line_search.py")
    finals = [float(x) for x in re.findall(r"final loss ([\d.]+)", out)]
    assert len(finals) == 4 and all(f < 0.3 for f in finals), out


def test_example_hf_spike_guard():
    pytest.importorskip("transformers")
    out = run("examples/hf_spike_guard.py")
    assert "plain Trainer:                 final loss nan" in out  # the NaN batch kills the plain Trainer
    assert re.search(r"iteration 80: rolled_back", out) and re.search(r"iteration 140: skipped", out), out
    # the spike's and the next batch's steps and the NaN step are not applied; nothing before them is undone
    assert "197 of 200 steps stand; the LR schedule followed them: it is at step 197" in out
    assert float(re.search(r"SpikeGuard:    final loss ([\d.]+)", out).group(1)) < 3.0


def test_example_lr_find(tmp_path):
    png = tmp_path / "lr.png"
    out = run("examples/lr_find.py", "--plot", str(png))
    assert "with vs without lr_find: bitwise identical: True" in out, out
    lr = float(re.search(r"suggested lr \(valley\): ([\d.e-]+)", out).group(1))
    assert 1e-4 < lr < 1.0
    assert re.search(r"find_batch_size: \d+ fits a 1 MiB step", out)
    assert float(re.search(r"held-out accuracy ([\d.]+)%", out).group(1)) > 80
    assert png.stat().st_size > 1000


def test_example_fault_triage(tmp_path):
    q = tmp_path / "q.jsonl"
    out = run("examples/fault_triage.py", "--quarantine", str(q))
    assert "plain training: final loss nan" in out  # the corrupt batch kills plain training
    assert re.search(r"iteration 40: transient \(non-finite loss \(nan\)\) -> continued; did not reproduce on rank 0", out)
    assert "iteration 70: reproducible (non-finite loss (nan)) -> skipped; quarantined batch 70" in out
    assert "bitwise identical to the fault-free run that skipped batch 70: True" in out
    assert "skipped from the quarantine without computing it: True; bitwise identical: True; diagnoses: 0" in out
    assert "determinism report: every rerun bitwise identical: True" in out
    assert float(re.search(r"FaultTriage: final loss ([\d.]+)", out).group(1)) < 0.5
    assert '"batch": 70' in q.read_text()


@pytest.mark.distributed
def test_example_ddp_spike_guard():
    out = run("examples/ddp_spike_guard.py")
    assert "plain DDP:  final loss nan" in out  # one rank's fault poisons every replica
    assert re.search(r"iteration 60: rolled_back \(loss spike", out) and "iteration 98: skipped (non-finite loss" in out
    assert float(re.search(r"SpikeGuard: final loss ([\d.]+)", out).group(1)) < 0.5
    assert "replicas bitwise identical: True" in out


# script: (sections its report must have, keys its JSON must have)
BENCHMARKS = {
    "bench_core.py": (["## Snapshot / restore", "## Targets"], {"core", "training", "targets"}),
    "bench_policies.py": (["## 1. Fault injection", "## 3. Overhead"], {"faults", "linesearch", "overhead", "verdicts"}),
    "bench_overlap.py": (["blocking snapshot: added"], {"rows", "verdicts"}),
    "bench_delta.py": (["whole HostArchive"], {"adam/archive", "sgd/archive"}),
    "bench_disk.py": (["rollback"], {"rollback_s", "exact"}),
    "bench_ddp.py": (["## DDP overhead", "replicas identical: True"], {"rows", "world_size"}),
    "bench_suite.py": (["## Suite sanity", "Every task learns with Adam"], {"settings", "rows", "verdicts", "results"}),
    "bench_tuners.py": (["## 1. Suggestions", "## 2. Leaves no trace", "## 3. Wall time"],
                        {"suggestions", "trace", "overhead", "restore"}),
    "bench_triage.py": (["## 1. Overhead", "## 2. Time to attribute", "## 3. Diagnoses", "## 4. Determinism"],
                        {"overhead", "attribution", "suite", "determinism", "verdicts"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(BENCHMARKS))
def test_benchmark_quick_runs(tmp_path, script):
    sections, keys = BENCHMARKS[script]
    path = tmp_path / "out.json"
    out = run(f"benchmarks/{script}", "--quick", "--json", str(path))
    assert out.startswith("# torchrewind") and all(s in out for s in sections), out[-2000:]
    res = json.loads(path.read_text())
    assert keys <= res.keys(), res.keys()
    if script == "bench_policies.py":
        assert len(res["settings"]["seeds"]) >= 3
    if script == "bench_disk.py":
        assert res["exact"] is True  # the rollback from disk was bitwise exact
    if script == "bench_suite.py":  # every task ran with both optimizers, none raised
        assert len({r["task"] for r in res["rows"]}) >= 12 and {r["config"] for r in res["rows"]} == {"adam", "sgd"}
        assert not [r["key"] for r in res["results"] if r["error"]]
    if script == "bench_ddp.py":
        assert res["world_size"] == 2 and res["replicas_identical"] is True  # the guards kept the ranks in step
    if script == "bench_triage.py":  # every diagnosis right, every run exact, CPU kernels deterministic
        s = res["suite"]
        assert s["runs"] >= 2 and s["right"] == s["runs"] and s["exact"] == s["runs"], s
        assert res["verdicts"]["cpu_determinism_zero"] is True
    if script == "bench_tuners.py":  # ours leaves no trace, whatever the peers do
        for rows in res["trace"].values():
            assert all(v is not False for k, v in rows["torchrewind lr_find"].items()), rows


@pytest.mark.slow
def test_bench_policies_variants_run_side_by_side(tmp_path):
    """--guard-variant / --search-variant add a SpikeGuard column and a LineSearch(SGD) row with other settings, with
    verdicts like the defaults' (how the README's explored settings are reproduced)."""
    path = tmp_path / "out.json"
    out = run("benchmarks/bench_policies.py", "--quick", "--tasks", "wine_zero", "--plans", "mixed",
              "--guard-variant", "lr_factor=0.1,detector.threshold=3", "--search-variant", "uphill=take,momentum=0",
              "--cache", str(tmp_path / "cache.json"), "--json", str(path), "--quiet")  # fmt: skip
    assert "SpikeGuard, `lr_factor=0.1,detector.threshold=3`" in out
    assert "`LineSearch`, SGD lr=1.0, `uphill=take,momentum=0`" in out
    res = json.loads(path.read_text())
    assert {"v[lr_factor=0.1,detector.threshold=3]/none", "v[lr_factor=0.1,detector.threshold=3]/mixed"} <= set(
        res["verdicts"]["guards"]
    )
    assert "`LineSearch`, SGD lr=1.0, `uphill=take,momentum=0`" in res["verdicts"]["search"]
    runs = {r["config"]: r for r in res["results"] if r["task"] == "wine_zero" and r["seed"] == 0}
    assert not [k for k, r in runs.items() if r.get("error")]
    assert "linesearch-sgd[uphill=take,momentum=0]" in " ".join(runs)


def test_bench_policies_parse_settings():
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_policies import parse_settings

    assert parse_settings("lr_factor=0.1,detector.threshold=3,uphill=take,buffers=None") == {
        "lr_factor": 0.1, "detector.threshold": 3, "uphill": "take", "buffers": None}  # fmt: skip
    with pytest.raises(SystemExit, match="key=value"):
        parse_settings("lr_factor")


@pytest.mark.slow
def test_probe_updates_runs():
    out = run("benchmarks/probe_updates.py", "--tasks", "wine_zero,vit_digits", "--seeds", "2", "--scale", "0.2",
              "--workers", "1")  # fmt: skip
    assert "| `vit_digits` | report |" in out and re.search(r"separated on \d of 2 tasks", out), out
