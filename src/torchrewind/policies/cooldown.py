"""The learning-rate cool-down after a spike: a factor on every lr for some steps, then a linear ramp back."""

from __future__ import annotations

from typing import Any

from .._checks import check_bool, check_int, check_number
from ._common import check_factor
from ._state import check_state, header


class LrCooldown:
    """The lr multiplier a guard applies to the steps after a roll-back.

    After :meth:`spiked`: ``lr_factor`` for ``cooldown`` steps, then a linear ramp back to 1 over ``ramp`` steps (ramp
    step r = 1..ramp runs at factor + (1 − factor)·r/ramp, so the last one is at the full lr). A spike after a step
    was taken at a reduced lr multiplies the current scale by ``lr_factor`` again (floored at ``min_lr_factor``); a
    spike with no step since the last one (a burst of bad batches) says nothing new and does not. ``lr_factor=1``
    means no cool-down.

    Example::

        cool = LrCooldown(lr_factor=0.5, cooldown=10, ramp=10)
        cool.spiked()                    # after a roll-back: cool.scale == 0.5
        cool.stepped(cool.scale)         # after each step that stands at that scale
    """

    def __init__(
        self, lr_factor: float = 0.5, min_lr_factor: float = 1e-3, cooldown: int = 10, ramp: int = 10,
        who: str = "LrCooldown",
    ) -> None:  # fmt: skip
        self.lr_factor = check_factor("lr_factor", lr_factor, who, one=True)
        self.min_lr_factor = check_factor("min_lr_factor", min_lr_factor, who, one=True)
        self.cooldown = check_int("cooldown", cooldown, 0, who)
        self.ramp = check_int("ramp", ramp, 0, who)
        self.factor = 1.0  # the multiplier set by the last spike
        self.cool_left = 0  # steps still to take at ``factor``
        self.ramp_left = 0  # ramp steps still to take
        self.tried = False  # whether a step was taken at the reduced lr since the last spike

    @property
    def scale(self) -> float:
        """The multiplier the next step's learning rates get (1.0 outside a cool-down)."""
        if self.cool_left > 0:
            return self.factor
        if self.ramp_left > 0:
            done = self.ramp - self.ramp_left + 1
            return self.factor + (1.0 - self.factor) * done / self.ramp
        return 1.0

    def spiked(self) -> float:
        """A roll-back happened: start (or deepen) the cool-down. Returns the new factor."""
        scale = self.scale
        if self.tried or scale == 1.0:
            self.factor = max(scale * self.lr_factor, self.min_lr_factor)
        self.tried = False
        self.cool_left, self.ramp_left = self.cooldown, self.ramp
        return self.factor

    def stepped(self, scale: float) -> None:
        """A step taken at ``scale`` stands: advance the cool-down (a step at the full lr changes nothing)."""
        if scale == 1.0:
            return
        self.tried = True
        if self.cool_left > 0:
            self.cool_left -= 1
        elif self.ramp_left > 0:
            self.ramp_left -= 1
        if self.cool_left == 0 and self.ramp_left == 0:
            self.factor = 1.0

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"lr_factor": self.lr_factor, "min_lr_factor": self.min_lr_factor, "cooldown": self.cooldown,
                "ramp": self.ramp}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The factor, the steps left of the cool-down and of the ramp, and the settings, as plain data."""
        return {**header(self, self.settings()), "factor": self.factor, "cool_left": self.cool_left,
                "ramp_left": self.ramp_left, "tried": self.tried}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` (``strict=False``: keep this object's settings; the steps left are capped at
        them). Refuses a malformed or mismatched state before changing anything."""
        who = "LrCooldown.load_state_dict"
        sd = check_state(self, state_dict, self.settings(), ("factor", "cool_left", "ramp_left", "tried"), strict, who)
        factor = check_number("factor", sd["factor"], who, lo=0.0, hi=1.0, lo_open=True)
        cool_left = min(check_int("cool_left", sd["cool_left"], 0, who), self.cooldown)
        ramp_left = min(check_int("ramp_left", sd["ramp_left"], 0, who), self.ramp)
        tried = check_bool("tried", sd["tried"], who)
        self.factor, self.cool_left, self.ramp_left, self.tried = factor, cool_left, ramp_left, tried
