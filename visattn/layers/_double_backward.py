"""Double backward for fast kernels whose backward is not differentiable.

``scaled_dot_product_attention``'s fused (flash) kernels and ``torch.compile``'d functions have a
fast backward that autograd cannot differentiate again: a gradient penalty
(``torch.autograd.grad(..., create_graph=True)`` and then a backward of that gradient) fails in
them with a raw torch error. Whether a graph of the backward will be needed is not known in the
forward, so :func:`twice_differentiable` runs the fast function and decides in the backward:

- an ordinary backward (no graph of it) is the fast function's own, through the graph its forward
  recorded (nothing is recomputed);
- a backward that builds a graph (``create_graph=True``) recomputes the result with a plain
  function of differentiable operations, from the same inputs, and differentiates that, so the
  gradient itself has a graph (and its gradients are those of the same math).

A recomputation gets copies of the inputs that need no gradient, so state the forward updates in
place (BatchNorm's running statistics) is updated once.

The fast path's results, speed and memory are unchanged; a gradient penalty costs one plain
forward more. Not for ``torch.compile`` tracing or ``torch.func`` transforms (the caller picks its
path there: this uses autograd inside the forward).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["twice_differentiable"]


def _detached(inputs: tuple) -> list:
    """The inputs as leaves of a graph of their own (same storage), needing grad where they did."""
    return [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in inputs]


def _copied_constants(inputs: tuple) -> list:
    """The inputs, with copies of the tensors that need no gradient: a recomputation in the
    backward must not update state a second time (BatchNorm's running statistics, updated in
    place by the forward)."""
    return [t.clone() if isinstance(t, torch.Tensor) and not t.requires_grad else t for t in inputs]


class _TwiceDifferentiable(torch.autograd.Function):
    """``fast(*inputs)``, whose backward is ``fast``'s, or ``plain``'s when it builds a graph."""

    @staticmethod
    def forward(ctx, fast: Callable, plain: Callable, *inputs):
        ctx.fast, ctx.plain = fast, plain
        ctx.save_for_backward(*inputs)
        device = next(t.device.type for t in inputs if isinstance(t, torch.Tensor))
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        leaves = _detached(inputs)
        with torch.enable_grad():
            out = fast(*leaves)
        ctx.inner = (out, leaves)  # fast's own graph: its backward needs no recomputation
        return out.detach()

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        inputs = ctx.saved_tensors
        want = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[2 + i]]
        grads = [None] * len(inputs)
        if not want:
            return (None, None, *grads)
        if torch.is_grad_enabled():  # building a graph of this backward: the plain math, recomputed
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, enabled=enabled, dtype=dtype):
                out = ctx.plain(*_copied_constants(inputs))
            found = torch.autograd.grad(out.to(dout.dtype), [inputs[i] for i in want], dout,
                                        create_graph=True, allow_unused=True)
        else:
            if ctx.inner is None:  # a second backward over a retained graph: run fast again
                leaves = _detached(_copied_constants(inputs))
                device, enabled, dtype = ctx.autocast
                with torch.enable_grad(), torch.autocast(device, enabled=enabled, dtype=dtype):
                    ctx.inner = (ctx.fast(*leaves), leaves)
            out, leaves = ctx.inner
            ctx.inner = None  # its buffers are freed by this backward
            found = torch.autograd.grad(out, [leaves[i] for i in want], dout, allow_unused=True)
        for i, g in zip(want, found):
            grads[i] = g
        return (None, None, *grads)


def twice_differentiable(fast: Callable[..., torch.Tensor], plain: Callable[..., torch.Tensor],
                         *inputs: torch.Tensor | None) -> torch.Tensor:
    """``fast(*inputs)``, differentiable twice: its backward is ``fast``'s own unless the backward
    builds a graph (``create_graph=True``), which differentiates ``plain(*inputs)`` (the same
    math in differentiable operations, recomputed then). Both take the same positional inputs
    (tensors or ``None``) and return one tensor.

    Plain ``fast(*inputs)`` when autograd does not look: no grad mode, no input that needs grad.
    """
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad
                                               for t in inputs):
        return fast(*inputs)
    return _TwiceDifferentiable.apply(fast, plain, *inputs)
