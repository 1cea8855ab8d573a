"""Divergence guard: a non-finite loss or gradient, or an exploding update, stops the run unsaved.

Checked every optimizer step: the loss before backward, the gradient norm before the update,
and the weights after it (finite, and a global norm that did not jump). The state that failed
is never checkpointed, so every checkpoint holds weights that passed these checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["DivergenceError", "NonFiniteLossError", "WEIGHT_GROWTH_LIMIT", "state_norms", "DivergenceGuard"]

WEIGHT_GROWTH_LIMIT = 4.0
"""An optimizer step that multiplies the global parameter norm by more than this is an explosion
(LAMB moves each layer by at most lr x its norm; no healthy step comes near)."""


class DivergenceError(RuntimeError):
    """Training diverged; the run stopped before saving the bad state."""


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; the run stops before the bad step touches the weights."""


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def state_norms(parameters: Iterable[torch.Tensor], buffers: Iterable[torch.Tensor]) -> tuple[float, float]:
    """Global L2 norms of the parameters and of the floating-point buffers (NaN/inf when any is)."""
    return _global_norm(list(parameters)), _global_norm([b for b in buffers if b.is_floating_point()])


class DivergenceGuard:
    """Raises :class:`DivergenceError` with a message that says where and what is still on disk.

    ``where()`` describes the current step; ``saved()`` says which checkpoint exists unchanged.
    """

    def __init__(self, where: Callable[[], str], saved: Callable[[], str]) -> None:
        self.where, self.saved = where, saved
        self.weight_norm: float | None = None

    def _fail(self, error: type[DivergenceError], what: str, consequence: str) -> DivergenceError:
        return error(
            f"{what} at {self.where()}; {consequence}. {self.saved()}. Lower optim.base_lr or check the data; "
            "a rerun of the same command resumes from the saved checkpoint"
        )

    def check_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise self._fail(NonFiniteLossError, f"loss is {loss}", "stopped before updating the weights")

    def check_gradients(self, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            raise self._fail(DivergenceError, f"gradient norm is {grad_norm}", "stopped before updating the weights")

    def check_weights(self, parameters: Iterable[torch.Tensor], buffers: Iterable[torch.Tensor]) -> None:
        """After an update: finite weights whose global norm grew at most ``WEIGHT_GROWTH_LIMIT`` times."""
        before = self.weight_norm
        after, buffer_norm = state_norms(parameters, buffers)
        if not (math.isfinite(after) and math.isfinite(buffer_norm)):
            raise self._fail(DivergenceError, "the update made weights non-finite", "that state is not saved")
        if before is not None and before > 0 and after > WEIGHT_GROWTH_LIMIT * before:
            raise self._fail(
                DivergenceError,
                f"the update blew the weights up (global norm {before:.4g} -> {after:.4g})",
                "that state is not saved",
            )
        self.weight_norm = after
