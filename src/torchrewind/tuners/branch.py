"""Branch-and-pick: an online, greedy hyperparameter step. From the current state, try each candidate setting for a
few steps on the same batches, keep the best by your metric, and continue from it.

In the spirit of AutoLRS (Jin et al., 2021), which picks each stage's lr from short trials started at a checkpoint:
here the "checkpoint" is a state held in memory (:class:`~torchrewind.tuners.hold.StateHold`), every trial starts
from it bit for bit (same weights, optimizer state, RNG, hence the same dropout masks), and the trials see the same
batches, so the candidates differ only by their setting.

The state it continues from is the winner's, reached by running the winner's steps again from the held state (the
trials' side effects — your metric's forward passes, say — are gone with it). On deterministic kernels the re-run is
bit for bit the trial (checked: ``BranchRound.rerun_exact``); when the winner was the last candidate tried and the
default metric is used, its state is simply kept.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from .._checks import check_choice, check_int, check_type
from ..errors import RewindError, RewindTypeError, RewindValueError
from ..rewind import Rewind
from ..trajectory import Event, Trajectory
from ._common import check_step_fns, hparam_keys, plain, run_step, set_hparam
from .hold import StateHold
from .lr_find import _pyplot

Candidate = dict[str, Any]  # param-group key -> value, or a function of the current value


def scaled(key: str, *factors: float) -> list[Candidate]:
    """Candidates that multiply ``key`` (e.g. ``"lr"``) by each factor: relative moves from wherever it is now.

    Example::

        BranchAndPick(model, opt, scaled("lr", 0.5, 1.0, 2.0), loss_fn=loss_fn, steps=20)
    """
    if not factors:
        raise RewindValueError("scaled(): give at least one factor.")
    return [{key: functools.partial(operator.mul, float(f))} for f in factors]


@dataclass
class BranchRound:
    """One branch-and-pick decision: the candidates' settings (resolved values of the first param group), their
    scores and per-step losses, which one was kept (``best``, ``None`` if every trial failed), and whether the
    re-run of the winner reproduced its trial bit for bit."""

    index: int
    settings: list[dict[str, Any]]
    scores: list[float]
    losses: list[list[float]]
    best: int | None
    rerun_exact: bool | None
    seconds: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BranchAndPick:
    """Try ``candidates`` for ``steps`` steps each from the current state on the same batches, keep the best.

    Example::

        bp = BranchAndPick(model, opt, scaled("lr", 0.5, 1, 2), loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]),
                           steps=10, metric=lambda losses: val_loss())
        for epoch in range(10):
            bp.step(loader_iter)                 # k trials of 10 steps, then continue from the winner
        bp.log.to_csv("branch.csv"); bp.plot("branch.png")

    Args:
        model, optimizer: what is trained (the state to hold is theirs, plus ``schedulers``/``scaler``/
            ``generators``, as for :func:`~torchrewind.lr_find`).
        candidates: settings to try, each a dict of param-group keys (``lr``, ``momentum``, ``weight_decay``,
            ``betas``, any key every group has) to a value, or to a function of the current value (see
            :func:`scaled`). Set in every param group; the winner's setting stays.
        loss_fn / train_step: one training iteration, as for :func:`~torchrewind.lr_find`.
        steps: steps per trial (and batches taken per :meth:`step`).
        metric: ``losses -> float`` called at the end of each trial with that trial's per-step training losses
            (evaluate a validation loss there if you like: its side effects are undone). Default: the mean of the
            losses after the first step (the first is the same for every candidate).
        mode: ``"min"`` (default) or ``"max"``: whether a lower or higher metric is better.
        rewind: your :class:`~torchrewind.Rewind` on ``optimizer`` (needs ``capacity >= steps``): trials are undone
            through it and the winner's steps become its newest history. Without it, a Rewind of its own holds the
            state between rounds (one copy of it: :meth:`close` releases it).
        log: a :class:`~torchrewind.Trajectory` to append every trial to (default: a new one, ``.log``).
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module] | None,
        optimizer: torch.optim.Optimizer,
        candidates: Sequence[Candidate],
        *,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        train_step: Callable[[Any], Any] | None = None,
        steps: int = 10,
        metric: Callable[[list[float]], float] | None = None,
        mode: str = "min",
        schedulers: Sequence[Any] | Any = (),
        scaler: torch.amp.GradScaler | None = None,
        generators: Sequence[torch.Generator] = (),
        rewind: Rewind | None = None,
        log: Trajectory | None = None,
    ) -> None:
        who = "BranchAndPick"
        check_type("optimizer", optimizer, torch.optim.Optimizer, who, "a torch.optim.Optimizer")
        check_step_fns(loss_fn, train_step, who)
        self.steps = check_int("steps", steps, 1, who)
        check_choice("mode", mode, ("min", "max"), who)
        if metric is None and steps < 2:
            raise RewindValueError(
                f"{who}: the default metric (mean loss after the first step) needs steps >= 2; pass metric= or more "
                "steps."
            )
        if metric is not None and not callable(metric):
            raise RewindTypeError(f"{who}: metric must be a callable losses -> float, got {type(metric).__name__}.")
        candidates = list(candidates)
        if len(candidates) < 2:
            raise RewindValueError(f"{who}: give at least 2 candidates (got {len(candidates)}).")
        valid = hparam_keys(optimizer)
        for i, c in enumerate(candidates):
            if not isinstance(c, dict) or not c:
                raise RewindTypeError(
                    f"{who}: candidates[{i}] must be a non-empty dict of param-group keys, got {c!r}."
                )
            bad = sorted(k for k in c if k not in valid)
            if bad:
                raise RewindValueError(
                    f"{who}: candidates[{i}] sets {bad}, not keys of every param group; valid: {sorted(valid)}."
                )
        if log is not None:
            check_type("log", log, Trajectory, who)
        self.model, self.optimizer, self.candidates = model, optimizer, candidates
        self.loss_fn, self.train_step, self.metric, self.mode = loss_fn, train_step, metric, mode
        self.schedulers, self.scaler, self.generators, self.rewind = schedulers, scaler, generators, rewind
        self.log = log if log is not None else Trajectory()
        self.rounds: list[BranchRound] = []
        self.kept_steps = 0  # optimizer steps that stand (the winners')
        # one hold for every round (retaken at each): a dedicated Rewind is built once, so holding and restoring
        # are a memcpy each; built now, so a bad rewind= fails here and not at the first step()
        self._hold: StateHold | None = StateHold(
            model, optimizer, schedulers=schedulers, scaler=scaler, generators=generators, rewind=rewind, steps=steps,
            who=who,
        )

    # ------------------------------------------------------------------ one decision
    def step(self, data: Iterable[Any]) -> BranchRound:
        """Take ``steps`` batches from ``data`` (an iterator or a sequence), try every candidate on them, continue
        from the best. Returns the :class:`BranchRound` (also appended to :attr:`rounds` and :attr:`log`)."""
        who = "BranchAndPick.step"
        batches = list(islice(iter(data), self.steps))
        if len(batches) < self.steps:
            raise RewindValueError(f"{who}: needs {self.steps} batches, data gave {len(batches)}.")
        t0 = time.perf_counter()
        settings, scores, losses = [], [], []
        hold = self._hold
        if hold is None:
            raise RewindError(f"{who}: close() was called; build a new BranchAndPick.")
        hold.retake()  # the state as it is now (training may have gone on since the last round)
        try:
            for i, cand in enumerate(self.candidates):
                if i:
                    hold.restore()
                settings.append(self._apply(cand))
                trial = self._run(batches)
                losses.append(trial)
                scores.append(self._score(trial))
            ok = [i for i, s in enumerate(scores) if math.isfinite(s)]
            best = (min if self.mode == "min" else max)(ok, key=lambda i: scores[i]) if ok else None
            rerun_exact = None
            if best is None:
                hold.restore()  # every trial failed: continue from where we were, nothing applied
            elif not (best == len(self.candidates) - 1 and self.metric is None):
                hold.restore()
                self._apply(self.candidates[best])
                again = self._run(batches)
                rerun_exact = _same(again, losses[best])
            else:
                rerun_exact = True  # the live state is the winner's trial itself
        except BaseException:
            hold.restore()  # an error in a trial or the metric: leave the state as it was before step()
            raise
        if best is not None:
            self.kept_steps += self.steps
        rnd = BranchRound(len(self.rounds), settings, scores, losses, best, rerun_exact, time.perf_counter() - t0,
                          self.kept_steps)  # fmt: skip
        self.rounds.append(rnd)
        for i, (s, sc, ls) in enumerate(zip(settings, scores, losses)):
            kind = "exhausted" if best is None else ("accepted" if i == best else "rejected")
            lr = s.get("lr")
            self.log.add(Event(
                iteration=rnd.index, step=self.kept_steps, kind=kind, loss=ls[0] if ls else None, loss_after=sc,
                lrs=(float(lr),) if isinstance(lr, (int, float)) else (), reason=f"candidate {i}: {s}",
                undone=0 if i == best else len(ls), extra={"setting": s, "score": sc, "losses": ls},
            ))  # fmt: skip
        return rnd

    def close(self) -> None:
        """Release the held copy of the state (a dedicated Rewind's snapshot). The log and rounds stay."""
        if self._hold is not None:
            self._hold.close()
            self._hold = None

    def _apply(self, cand: Candidate) -> dict[str, Any]:
        for k, v in cand.items():
            set_hparam(self.optimizer, k, v)
        g = self.optimizer.param_groups[0]
        return {k: plain(g[k]) for k in cand}

    def _run(self, batches: list[Any]) -> list[float]:
        out = []
        for b in batches:
            out.append(run_step(self.optimizer, b, self.loss_fn, self.train_step, self.scaler))
            if not math.isfinite(out[-1]):
                break  # a diverged trial: its score is nan
        return out

    def _score(self, losses: list[float]) -> float:
        if len(losses) < self.steps or not all(math.isfinite(v) for v in losses):
            return math.nan
        if self.metric is None:
            tail = losses[1:]
            return sum(tail) / len(tail)
        v = self.metric(list(losses))
        v = float(v.item() if isinstance(v, torch.Tensor) else v)
        return v if math.isfinite(v) else math.nan

    # ------------------------------------------------------------------ reporting
    def plot(self, path: str | Path | None = None) -> Any:
        """Every candidate's score per round (the kept one highlighted) and the kept settings over the rounds.
        Needs matplotlib."""
        plt = _pyplot(path, None)
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for r in self.rounds:
            for i, s in enumerate(r.scores):
                if math.isfinite(s):
                    kept = i == r.best
                    a1.scatter(r.index, s, marker="o" if kept else "x", color="tab:green" if kept else "tab:gray",
                               s=36 if kept else 20, zorder=3 if kept else 2)  # fmt: skip
        a1.set_ylabel("metric per candidate")
        a1.set_title(f"branch-and-pick: {len(self.candidates)} candidates x {self.steps} steps per round")
        keys = sorted({k for c in self.candidates for k in c})
        for k in keys:
            pts = [(r.index, r.settings[r.best][k]) for r in self.rounds if r.best is not None]
            pts = [(i, v) for i, v in pts if isinstance(v, (int, float))]
            if pts:
                a2.plot(*zip(*pts), marker=".", label=k)
        if all(isinstance(v, (int, float)) and v > 0 for r in self.rounds if r.best is not None
               for v in r.settings[r.best].values()):  # fmt: skip
            a2.set_yscale("log")
        a2.set_xlabel("round")
        a2.set_ylabel("kept setting")
        if a2.get_legend_handles_labels()[0]:
            a2.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))
