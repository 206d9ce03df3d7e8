"""``torchrewind demo``: rescue training at a too-high learning rate by undoing the steps that made things worse.

Two runs of the same MLP on scikit-learn's bundled ``digits`` data set (no download), same initial weights, same
mini-batches, Adam at a learning rate that is too high:

1. **plain**: ordinary training.
2. **rewind**: after each step, the loss on the step's own mini-batch is evaluated again; if the step raised it
   (by more than a small tolerance), ``rw.retry(lr=lambda lr: lr / 2)`` undoes the step bit for bit and takes it
   again with half the learning rate and the same gradients (at most ``max_retries`` times), and every accepted
   step lets the learning rate grow back by ``recover`` up to its initial value.

Everything happens inside functions; :func:`run_demo` returns the numbers and per-step logs, :func:`format_report`
turns them into the printed table and :func:`plot` draws the PNG (matplotlib optional). Global torch state touched
for the run (RNG, intra-op thread count, denormal flushing) is restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .rewind import Rewind

DEFAULT_STEPS = 600
QUICK_STEPS = 60
DEFAULT_LR = 0.1
HIDDEN = (128, 128)


# ---------------------------------------------------------------------------------------------------------- data
def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), pixels scaled to [0, 1], split 75/25
    (stratified, shuffled with ``seed``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is in the demo and test extras
        raise ImportError("the demo needs scikit-learn: pip install 'torchrewind[demo]'") from e
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    as_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return {"x_train": as_x(x_train), "y_train": as_y(y_train), "x_test": as_x(x_test), "y_test": as_y(y_test)}


def make_batches(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Index tensors for ``steps`` mini-batches: reshuffled every epoch by a private generator (so both runs see
    exactly the same batches, whatever the global RNG does)."""
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen)
        batches += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return batches[:steps]


def make_model(seed: int, n_in: int = 64, n_out: int = 10, hidden: tuple[int, ...] = HIDDEN) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for width in hidden:
        layers += [torch.nn.Linear(n_in, width), torch.nn.ReLU()]
        n_in = width
    layers.append(torch.nn.Linear(n_in, n_out))
    return torch.nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------- training
def train(
    data: dict[str, torch.Tensor],
    batches: list[torch.Tensor],
    *,
    lr: float,
    seed: int,
    rewind: bool,
    tolerance: float = 0.02,
    max_retries: int = 5,
    recover: float = 1.05,
) -> dict[str, Any]:
    """One training run. With ``rewind=True`` a step that raises its own mini-batch's loss by more than
    ``tolerance`` (relative) is retried at half the learning rate, at most ``max_retries`` times (then the last try
    is kept), and each accepted step multiplies the learning rate by ``recover`` (capped at ``lr``).

    Why a tolerance: once the loss is small, Adam's momentum makes many steps nudge their own batch's loss up by a
    hair whatever the lr; with ``tolerance=0`` those steps exhaust their retries and the lr collapses to ~1e-9.
    """
    x, y = data["x_train"], data["y_train"]
    model = make_model(seed, n_in=x.shape[1], n_out=int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()  # after Adam's constructor, whose first call imports torch._dynamo (seconds)
    # capacity=1: only the last step is ever undone; redo=False: we never redo, so skip keeping the undone state.
    rw = Rewind(model, opt, capacity=1, redo=False) if rewind else None

    log: list[dict[str, Any]] = []
    undone = exhausted = 0
    for step, idx in enumerate(batches):
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        step_lr = opt.param_groups[0]["lr"]
        opt.step()
        before = loss.item()
        entry: dict[str, Any] = {"step": step, "loss": before, "lr": step_lr, "retries": 0, "rejected": []}
        if rw is not None:
            while True:
                with torch.no_grad():
                    after = F.cross_entropy(model(xb), yb).item()
                if after <= before * (1.0 + tolerance):
                    break
                if entry["retries"] == max_retries:
                    exhausted += 1  # keep this try: its lr is already 2**max_retries times smaller
                    break
                entry["rejected"].append({"lr": step_lr, "loss": after})
                rw.retry(lr=lambda old: old * 0.5)  # undo the step, halve lr, step again with the same grads
                step_lr = opt.param_groups[0]["lr"]
                entry["retries"] += 1
                undone += 1
            entry["lr"] = step_lr
            entry["loss_after"] = after
            for group in opt.param_groups:
                group["lr"] = min(group["lr"] * recover, lr)
        log.append(entry)
    wall = time.perf_counter() - start
    if rw is not None:
        rw.close()

    with torch.no_grad():
        train_loss = F.cross_entropy(model(x), y).item()
        test_acc = (model(data["x_test"]).argmax(dim=1) == data["y_test"]).float().mean().item()
    return {
        "name": "rewind" if rewind else "plain",
        "final_train_loss": train_loss,
        "test_accuracy": test_acc,
        "undone_steps": undone,
        "exhausted_steps": exhausted,
        "final_lr": opt.param_groups[0]["lr"],
        "wall_time_s": wall,
        "log": log,
    }


@contextlib.contextmanager
def _isolated_torch() -> Iterator[None]:
    """Run with one intra-op thread and denormals flushed to zero, and leave the caller's RNG untouched.

    A 64-128-128-10 MLP is far too small to gain from intra-op threads, and on a busy machine they cost a lot; Adam's
    second moments for a well-fit model underflow into denormal floats, which are ~20x slower on x86 CPUs.
    """
    threads = torch.get_num_threads()
    flushing = _flush_denormal_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(flushing)
            torch.set_num_threads(threads)


def _flush_denormal_enabled() -> bool:
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal
    return (tiny * 1.0).item() == 0.0


def run_demo(
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    *,
    quick: bool = False,
    batch_size: int = 64,
    tolerance: float = 0.02,
    max_retries: int = 5,
    recover: float = 1.05,
) -> dict[str, Any]:
    """Train the plain and the rewind run; returns the settings, both runs' results and per-step logs.

    ``steps`` defaults to 600 (60 with ``quick=True``). Result keys: ``settings``, ``plain``, ``rewind`` (each with
    ``final_train_loss``, ``test_accuracy``, ``undone_steps``, ``exhausted_steps``, ``final_lr``,
    ``wall_time_s`` and ``log``: one dict per step with the mini-batch ``loss`` before the step, the ``lr`` of the
    step that was kept, its ``retries`` and the ``rejected`` tries as ``{"lr", "loss"}``).
    """
    if steps is None:
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    data = load_data(seed)
    n_train, n_in = data["x_train"].shape
    batches = make_batches(n_train, steps, batch_size, seed)
    settings = {
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "tolerance": tolerance,
        "max_retries": max_retries,
        "recover": recover,
        "n_train": n_train,
        "n_test": len(data["y_test"]),
        "layers": (n_in, *HIDDEN, int(data["y_train"].max()) + 1),
    }
    runs = {}
    with _isolated_torch():
        for name in ("plain", "rewind"):
            runs[name] = train(
                data,
                batches,
                lr=lr,
                seed=seed,
                rewind=name == "rewind",
                tolerance=tolerance,
                max_retries=max_retries,
                recover=recover,
            )
    return {"settings": settings, **runs}


# ---------------------------------------------------------------------------------------------------------- output
def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    layers = "-".join(str(n) for n in s["layers"])
    lines = [
        f"torchrewind demo: MLP {layers} on scikit-learn digits ({s['n_train']} train / {s['n_test']} test images),",
        f"Adam at lr={s['lr']:g}{_too_high(s)}, {s['steps']} step{'s' if s['steps'] != 1 else ''} of batch "
        f"{s['batch_size']}, seed {s['seed']}; both runs: same initial weights, same batches.",
        f"rewind: after each step, re-evaluate the loss on the same mini-batch; if it rose by more than "
        f"{s['tolerance']:.0%}, rw.retry(lr=lr/2)",
        f"        (at most {s['max_retries']} times per step); each accepted step lets lr grow x{s['recover']:g} "
        f"back up to {s['lr']:g}.",
        "",
    ]
    header = ("run", "final train loss", "test accuracy", "undone steps", "final lr", "wall time")
    rows = [header]
    for name in ("plain", "rewind"):
        r = result[name]
        rows.append(
            (
                name,
                f"{r['final_train_loss']:.4f}",
                f"{r['test_accuracy']:.1%}",
                str(r["undone_steps"]),
                f"{r['final_lr']:.3g}",
                f"{r['wall_time_s']:.2f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    rw = result["rewind"]
    retried = sum(1 for e in rw["log"] if e["retries"])
    lines.append("")
    lines.append(
        f"rewind retried {retried} of {s['steps']} steps ({rw['undone_steps']} undos in all)"
        + (
            f"; {rw['exhausted_steps']} step(s) still worse after {s['max_retries']} halvings were kept."
            if rw["exhausted_steps"]
            else "."
        )
    )
    return "\n".join(lines)


def _too_high(settings: dict[str, Any]) -> str:
    return " (too high on purpose)" if settings["lr"] == DEFAULT_LR else ""


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Save both runs' loss curves (and the rewind run's lr) as a PNG; needs matplotlib. Returns the path.

    Uses matplotlib's object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result["settings"]
    plain, rw = result["plain"], result["rewind"]
    colors = {"plain": "tab:blue", "rewind": "tab:green"}
    window = max(1, min(25, s["steps"] // 20))

    fig = Figure(figsize=(10, 6.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for run in (plain, rw):
        steps = [e["step"] for e in run["log"]]
        losses = [e["loss"] for e in run["log"]]
        c = colors[run["name"]]
        ax.plot(steps, losses, color=c, alpha=0.22, lw=0.8)
        ax.plot(
            steps,
            _running_mean(losses, window),
            color=c,
            lw=2,
            label=f"{run['name']}: final train loss {run['final_train_loss']:.4f}, "
            f"test acc {run['test_accuracy']:.1%}",
        )
    rx = [e["step"] for e in rw["log"] for _ in e["rejected"]]
    ry = [r["loss"] for e in rw["log"] for r in e["rejected"]]
    ax.scatter(
        rx, ry, marker="x", color="tab:red", s=28, lw=1.3, zorder=3,
        label=f"rejected try ({len(rx)}): batch loss after the step, >{s['tolerance']:.0%} above before it; "
        "undone, retried at lr/2",
    )  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy on the mini-batch")
    ax.set_title(
        f"torchrewind demo: Adam at lr={s['lr']:g}{_too_high(s)} on scikit-learn digits "
        f"(MLP {'-'.join(map(str, s['layers']))}, seed {s['seed']})"
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.95), fontsize=9, framealpha=0.9)
    ax.text(
        0.995, 0.985, f"faint: loss of each mini-batch before its step; bold: running mean over {window} steps",
        transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.35",
    )  # fmt: skip

    lr_labels = {
        "plain": "plain: fixed lr",
        "rewind": f"rewind: lr of the kept try (/2 per undo, x{s['recover']:g} per accepted step)",
    }
    for run in (plain, rw):
        ax_lr.plot(
            [e["step"] for e in run["log"]], [e["lr"] for e in run["log"]],
            color=colors[run["name"]], lw=1.5, label=lr_labels[run["name"]],
        )  # fmt: skip
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, which="major", alpha=0.3)
    lowest = min(e["lr"] for run in (plain, rw) for e in run["log"])
    ax_lr.set_ylim(lowest / 12, s["lr"] * 2)
    ax_lr.legend(loc="lower left", ncol=2, fontsize=9, framealpha=0.9)
    ax_lr.set_xlim(0, s["steps"] - 1 if s["steps"] > 1 else 1)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def demo_main(
    steps: int | None = None,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    out: str | Path = "torchrewind-demo.png",
    no_plot: bool = False,
    quick: bool = False,
) -> int:
    """The ``demo`` subcommand: run, print the table, save the plot. Returns the exit code."""
    result = run_demo(steps=steps, lr=lr, seed=seed, quick=quick)
    print(format_report(result))
    if no_plot:
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'torchrewind[demo]' to get it).")
        return 0
    path = plot(result, out)
    print(f"plot saved to {path.resolve()}")
    return 0
