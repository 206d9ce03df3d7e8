"""The ``torchrewind demo`` command: its numbers tell the story they claim, and the CLI works."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from torchrewind import (
    Rewind,  # noqa: E402
    demo,  # noqa: E402
)
from torchrewind.__main__ import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick():
    return demo.run_demo(quick=True)


def test_quick_runs_share_weights_and_batches(quick):
    plain, rw = quick["plain"], quick["rewind"]
    steps = quick["settings"]["steps"]
    assert steps == demo.QUICK_STEPS
    assert len(plain["log"]) == len(rw["log"]) == steps
    # Same initial weights, same first batch: the loss that produced the first gradients is bit-identical.
    assert plain["log"][0]["loss"] == rw["log"][0]["loss"]
    assert 2.0 < plain["log"][0]["loss"] < 2.7  # ~ln(10): an untrained 10-class classifier


def test_quick_rewind_undoes_steps_and_wins(quick):
    plain, rw = quick["plain"], quick["rewind"]
    s = quick["settings"]
    assert plain["undone_steps"] == 0 and plain["final_lr"] == s["lr"]
    assert all(e["lr"] == s["lr"] and not e["rejected"] for e in plain["log"])
    assert rw["undone_steps"] >= 1
    assert rw["undone_steps"] == sum(e["retries"] for e in rw["log"]) == sum(len(e["rejected"]) for e in rw["log"])
    # The demo's lr is too high: the very first step overshoots and is undone.
    assert rw["log"][0]["retries"] >= 1
    for e in rw["log"]:
        for k, r in enumerate(e["rejected"]):
            assert r["loss"] > e["loss"] * (1 + s["tolerance"])  # only steps that made the batch worse were undone
            assert r["lr"] == e["rejected"][0]["lr"] / 2**k  # each retry halves the lr of the previous try
        if e["rejected"]:
            assert e["lr"] == e["rejected"][-1]["lr"] / 2
        if e["retries"] < s["max_retries"]:
            assert e["loss_after"] <= e["loss"] * (1 + s["tolerance"])
        assert 0 < e["lr"] <= s["lr"]
    assert rw["final_train_loss"] < plain["final_train_loss"]
    assert rw["test_accuracy"] > plain["test_accuracy"]


def test_retried_step_is_bitwise_a_fresh_step_at_the_lower_lr(quick):
    """The first step was undone and retried: the kept result must equal one plain Adam step at the final lr."""
    first = quick["rewind"]["log"][0]
    data = demo.load_data(0)
    (idx,) = demo.make_batches(len(data["y_train"]), 1, quick["settings"]["batch_size"], 0)
    xb, yb = data["x_train"][idx], data["y_train"][idx]
    with demo._isolated_torch():  # same thread count as run_demo, for bitwise-equal arithmetic
        model = demo.make_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=first["lr"])
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        with torch.no_grad():
            after = torch.nn.functional.cross_entropy(model(xb), yb).item()
    assert after == first["loss_after"]


def test_run_demo_leaves_global_torch_state_alone():
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    flushing = demo._flush_denormal_enabled()
    demo.run_demo(steps=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert demo._flush_denormal_enabled() == flushing


def test_run_demo_is_deterministic():
    a, b = demo.run_demo(steps=20, seed=3), demo.run_demo(steps=20, seed=3)
    for name in ("plain", "rewind"):
        assert a[name]["log"] == b[name]["log"]
        assert a[name]["final_train_loss"] == b[name]["final_train_loss"]


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()]
    assert any(r[:1] == ["plain"] and len(r) >= 6 for r in rows)
    assert any(r[:1] == ["rewind"] and len(r) >= 6 for r in rows)
    for column in ("final train loss", "test accuracy", "undone steps", "final lr", "wall time"):
        assert column in text
    assert str(out.resolve()) in text
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_cli_demo_no_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--steps", "5", "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "5 steps" in text and "rewind" in text and "plot saved" not in text
    assert list(tmp_path.iterdir()) == []


def test_cli_demo_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["demo", "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "pip install 'torchrewind[demo]'" in text
    assert list(tmp_path.iterdir()) == []


def test_cli_help_and_errors(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--steps", "--lr", "--seed", "--out", "--no-plot", "--quick"):
        assert option in help_text
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
    assert main(["demo", "--lr", "-1"]) == 2
    assert main(["nope"]) == 2


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "torchrewind", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout


@pytest.mark.slow
def test_default_settings_rewind_beats_plain():
    result = demo.run_demo()
    plain, rw = result["plain"], result["rewind"]
    assert result["settings"]["steps"] == demo.DEFAULT_STEPS
    assert plain["log"][0]["loss"] == rw["log"][0]["loss"]
    assert rw["undone_steps"] >= 1
    # Plain Adam at lr=0.1 stalls; with undo + halving the same model fits the training set.
    assert rw["final_train_loss"] < 0.1 * plain["final_train_loss"]
    assert rw["test_accuracy"] > plain["test_accuracy"] + 0.03


def test_rewind_used_by_demo_is_the_public_one():
    assert demo.Rewind is Rewind
