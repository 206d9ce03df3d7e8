"""The trajectory log: every decision a policy takes, in memory, exportable to CSV/JSON and plottable."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._checks import check_type
from .errors import RewindValueError

KINDS = ("accepted", "rejected", "rolled_back", "skipped", "exhausted")


@dataclass
class Event:
    """One decision.

    ``kind``: ``accepted`` (a step was applied and kept), ``rejected`` (a trial step was undone and will be
    retried), ``rolled_back`` (history was undone after a spike), ``skipped`` (no step was applied, e.g. non-finite
    loss or gradients), ``exhausted`` (a search gave up and left the state as before the step).
    """

    iteration: int  # policy calls so far (0-based): one per training iteration
    step: int  # optimizer steps kept so far, after this decision
    kind: str
    loss: float | None = None  # loss at the parameters the step started from
    loss_after: float | None = None  # loss at the trial parameters, when evaluated
    lrs: tuple[float, ...] = ()  # learning rate of each param group used by this decision
    reason: str = ""
    undone: int = 0  # steps undone by this decision
    skipped_batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _num(v: Any) -> Any:
    """JSON has no inf/nan: encode them as strings, at any depth."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _num(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_num(x) for x in v]
    return v


class Trajectory:
    """An append-only list of :class:`Event` with export and plotting.

    Example::

        log = Trajectory()
        guard = SpikeGuard(rw, log=log)
        ...; log.to_csv("run.csv"); log.plot("run.png")
    """

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, event: Event) -> Event:
        self.events.append(event)
        return event

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    def __getitem__(self, i: int) -> Event:
        return self.events[i]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for e in self.events:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def records(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.events]

    def state_dict(self) -> dict[str, Any]:
        """The events as plain dicts (``torch.save``-able, JSON-able), for a checkpoint.

        Example::

            ckpt["log"] = guard.log.state_dict()
            log = Trajectory(); log.load_state_dict(ckpt["log"])
        """
        return {"events": self.records()}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Replace the events by those of :meth:`state_dict` (``strict`` is accepted for a uniform interface).
        Refuses a malformed state before changing anything."""
        who = "Trajectory.load_state_dict"
        check_type("state_dict", state_dict, dict, who, "a dict returned by Trajectory.state_dict()")
        rows = check_type("state_dict['events']", state_dict.get("events"), (list, tuple), who, "a list of events")
        names = {f.name for f in fields(Event)}
        events = []
        for r in rows:
            if not isinstance(r, dict) or set(r) != names or r["kind"] not in KINDS:
                raise RewindValueError(f"{who}: not an event of Trajectory.state_dict(): {r!r}.")
            events.append(Event(**{**r, "lrs": tuple(r["lrs"]), "extra": dict(r["extra"])}))
        self.events = events

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(_num(self.records()), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        names = [f.name for f in fields(Event)]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=names)
        w.writeheader()
        for r in self.records():
            r["lrs"] = " ".join(repr(x) for x in r["lrs"])
            r["extra"] = json.dumps(_num(r["extra"]), allow_nan=False) if r["extra"] else ""
            w.writerow(r)
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:  # csv already wrote \r\n line ends
                f.write(text)
        return text

    def plot(self, path: str | Path | None = None, *, ax: Any = None, title: str = "") -> Any:
        """Loss per iteration (kept steps as a line; rejected trials, roll-backs and skips marked) with the learning
        rate of the first param group on a second axis. Needs matplotlib (``pip install torchrewind[plot]``).
        Returns the figure; saves it when ``path`` is given."""
        try:
            import matplotlib

            if path is not None and ax is None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - exercised only without matplotlib
            raise ImportError("Trajectory.plot needs matplotlib: pip install 'torchrewind[plot]'") from e
        if ax is None:
            fig, ax = plt.subplots(figsize=(9, 4.5))
        else:
            fig = ax.figure
        kept = [(e.iteration, e.loss) for e in self.events if e.kind == "accepted" and _finite(e.loss)]
        if kept:
            ax.plot(*zip(*kept), lw=1.2, color="tab:blue", label="loss (kept steps)")
        marks = {
            "rejected": ("x", "tab:red", "rejected trial (loss after)"),
            "rolled_back": ("v", "tab:purple", "spike: rolled back"),
            "skipped": ("s", "tab:orange", "skipped step"),
            "exhausted": ("X", "black", "search gave up"),
        }
        for kind, (m, c, label) in marks.items():
            pts = [(e.iteration, _plot_loss(e)) for e in self.events if e.kind == kind]
            pts = [(i, v) for i, v in pts if _finite(v)]
            if pts:
                ax.scatter(*zip(*pts), marker=m, color=c, s=28, zorder=3, label=f"{label} ({len(pts)})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        losses = [v for _, v in kept]
        if losses and min(losses) > 0:
            ax.set_yscale("log")
        lr_pts = [(e.iteration, e.lrs[0]) for e in self.events if e.lrs and e.kind == "accepted"]
        if lr_pts:
            ax2 = ax.twinx()
            ax2.plot(*zip(*lr_pts), lw=1, ls="--", color="tab:green", label="lr (group 0)")
            ax2.set_ylabel("learning rate")
            ax2.set_yscale("log")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
        elif self.events:
            ax.legend(loc="upper right", fontsize=8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _plot_loss(e: Event) -> float | None:
    if e.kind == "rejected" and _finite(e.loss_after):
        return e.loss_after
    return e.loss
