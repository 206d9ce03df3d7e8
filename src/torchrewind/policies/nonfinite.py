"""NonFiniteGuard: never apply a step whose loss or gradients are NaN/Inf."""

from __future__ import annotations

from .guard import Decision, Guard


class NonFiniteGuard(Guard):
    """Never applies a step whose loss or gradients are NaN/Inf; logs it and carries on. After
    ``max_consecutive`` such iterations in a row it raises :class:`~torchrewind.RewindError` with the recent history
    (optax's ``apply_if_finite(inner, max_consecutive_errors)``, for any torch optimizer, across ranks).

    With ``check_params=True`` it also checks the parameters after each step and undoes a step that made any of
    them non-finite (costs one reduction over the parameters per step). ``check_grads=False`` checks the loss only
    (no gradient norm, no sync for it).

    Example::

        guard = NonFiniteGuard(Rewind(model, opt))
        loss.backward()
        guard.step(loss)              # instead of opt.step()
    """

    def decide(self, loss: float, grad_norm: float | None) -> Decision:
        """Skip a step whose loss or gradient norm is not finite; apply any other.

        Example::

            guard.decide(float("nan"), 1.0)      # Decision(action='skip', reason='non-finite loss (nan)')
        """
        reason = self.nonfinite_reason(loss, grad_norm)
        return self.nonfinite_decision(reason) if reason else Decision.apply()
