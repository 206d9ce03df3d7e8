"""The roll-back budget: how many roll-backs a guard may take within a window of iterations before it gives up."""

from __future__ import annotations

from collections import deque
from typing import Any

from .._checks import check_int, check_type
from ._state import check_state, header


class RollbackBudget:
    """At most ``max_rollbacks`` roll-backs within any ``budget_window`` iterations: a run that keeps spiking is not
    recovering, and a guard should stop it rather than roll back forever.

    Example::

        budget = RollbackBudget(max_rollbacks=20, budget_window=200)
        if not budget.charge(iteration): raise RuntimeError("training keeps spiking")
    """

    def __init__(self, max_rollbacks: int = 20, budget_window: int = 200, who: str = "RollbackBudget") -> None:
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 1, who)
        self.budget_window = check_int("budget_window", budget_window, 1, who)
        self.recent: deque[int] = deque()  # iterations of the roll-backs within the window

    def charge(self, iteration: int) -> bool:
        """Count a roll-back at ``iteration``; False if that exceeds the budget (it stays counted)."""
        self.recent.append(iteration)
        while self.recent and self.recent[0] <= iteration - self.budget_window:
            self.recent.popleft()
        return len(self.recent) <= self.max_rollbacks

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"max_rollbacks": self.max_rollbacks, "budget_window": self.budget_window}

    def state_dict(self) -> dict[str, Any]:
        """The iterations of the roll-backs still within the window, and the settings, as plain data."""
        return {**header(self, self.settings()), "recent": list(self.recent)}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`; refuses a malformed or mismatched state before changing anything."""
        who = "RollbackBudget.load_state_dict"
        sd = check_state(self, state_dict, self.settings(), ("recent",), strict, who)
        recent = [check_int("recent[i]", i, 0, who) for i in check_type("recent", sd["recent"], (list, tuple), who)]
        self.recent = deque(recent)
