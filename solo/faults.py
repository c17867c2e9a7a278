"""Deterministic fault injection for the reliability tests (tests/test_reliability.py).

Off unless the environment variable SOLO_FAULT_INJECT names a point and a step, comma-separated,
e.g. `SOLO_FAULT_INJECT=nonfinite_loss@step=3`. Steps are 1-based, as logged. Points:

* `nonfinite_loss`: that step's per-token loss is multiplied by NaN inside the forward step, so the
  loss and, through the real backward pass, every gradient are NaN, as in a real divergence;
* `nonfinite_grad`: that step's gradients are NaN while its loss stays finite, as when a bad batch
  overflows in backward only;
* `crash_in_save`: every rank SIGKILLs itself once that step's checkpoint tensors are written,
  before the rename that commits the checkpoint (`solo.checkpoint.save_checkpoint`).

The poisoned forward steps go through megatron-core's schedule like any other, so what the tests
see (the optimizer's inf/NaN check, the step verdict) is what a real divergence would produce.
"""

from __future__ import annotations

import os
import signal

import torch

FAULT_ENV = "SOLO_FAULT_INJECT"


def fault_injected(point: str, step: int) -> bool:
    """Is `point@step=N` in $SOLO_FAULT_INJECT?"""
    spec = os.environ.get(FAULT_ENV, "")
    return f"{point}@step={step}" in (item.strip() for item in spec.split(","))


def crash_if_injected(point: str, step: int) -> None:
    """SIGKILL this process (no cleanup, no exit handlers) if `point@step=N` is injected."""
    if fault_injected(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def inject_into_forward_step(forward_step, step: int):
    """`forward_step`, poisoned if a non-finite fault is injected at `step`; else unchanged."""
    if fault_injected("nonfinite_loss", step):
        forward_step = _nan_loss(forward_step)
    if fault_injected("nonfinite_grad", step):
        forward_step = _nan_grad(forward_step)
    return forward_step


def _nan_loss(forward_step):
    def poisoned(data_iterator, model):
        per_token_loss, loss_func = forward_step(data_iterator, model)
        return per_token_loss * float("nan"), loss_func
    return poisoned


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: gradients diverge while the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_grad(forward_step):
    def poisoned(data_iterator, model):
        per_token_loss, loss_func = forward_step(data_iterator, model)
        return _NaNGradient.apply(per_token_loss), loss_func
    return poisoned
