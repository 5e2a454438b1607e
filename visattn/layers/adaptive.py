"""Adaptively sparse attention: multi-head self-attention whose softmax is replaced by
alpha-entmax with a learned alpha per head, so each query gives exactly zero weight to the keys
outside a support whose size the content decides.

Paper: Correia, Niculae, Martins. "Adaptively Sparse Transformers", EMNLP 2019.
https://arxiv.org/abs/1909.00015 (alpha-entmax: Peters, Niculae, Martins. "Sparse
Sequence-to-Sequence Models", ACL 2019, https://arxiv.org/abs/1905.05702).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import check_heads, check_pos_embed, project_qkv
from ._base import AttentionBlock, check_input

__all__ = ["AdaptiveSparseAttention", "entmax_bisect"]

#: The smallest alpha the block uses (the authors clamp to 1.01: the map tends to softmax as alpha
#: tends to 1, where the threshold search's ``z ** (1 / (alpha - 1))`` has no finite limit).
ALPHA_MIN = 1.01
#: Score elements (batch x heads x queries x keys) per chunk of queries: bounds the memory of the
#: forward and of the recomputing backward.
CHUNK_ELEMENTS = 2 ** 22


def _fixed_steps() -> bool:
    """Whether :func:`_threshold` must run a fixed number of steps: under ``torch.compile`` or a
    ``torch.func`` transform (``vmap``, ``grad``), where a data-dependent stop is not possible."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _max_steps(dtype: torch.dtype) -> int:
    """Most Newton steps of :func:`_threshold`. Eager, it stops as soon as every row's step is
    below rounding (typically 3-7 steps); under ``torch.compile`` or ``torch.func`` (no
    data-dependent stop) it runs the fixed ``_COMPILED_STEPS``."""
    if _fixed_steps():
        return _COMPILED_STEPS[dtype == torch.float64]
    return 60 if dtype == torch.float64 else 40


#: Fixed Newton steps under ``torch.compile`` or ``torch.func`` (float32, float64): enough for near-sparsemax heads on
#: ~10^4 keys with scores of small spread, the slowest case (the support shrinks over the steps).
_COMPILED_STEPS = (14, 18)


def _threshold(x: torch.Tensor, alpha: torch.Tensor,
               max_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The threshold ``tau`` with ``sum_i [(alpha - 1) (x_i - max x) - tau]_+ ^ (1 / (alpha - 1)) = 1``
    over the last dim, that sum at the returned ``tau`` and the unnormalised weights
    ``[(alpha - 1) (x - max x) - tau]_+ ^ (1 / (alpha - 1))`` at it (so ``weights / sum`` is the
    entmax; :func:`_probs` recomputes them from ``tau``).

    The scores are shifted by their row's max first (entmax does not change when a constant is
    added to a row; ``tau`` moves with it), so the largest shifted score is exactly 0 and
    ``tau`` lies in ``[-1, 0)`` whatever the scores' magnitude. Unshifted, scores of 10^8 (an input
    scaled by 10^4) leave no float32 resolution for ``tau``'s offset of 1 from the max: the
    largest term rounded to 0, the sum to 0, and the Newton step to 0 / 0 = NaN.

    Newton's method on ``phi(tau) = ||[(alpha - 1) x - tau]_+||_e - 1`` with ``e = 1 / (alpha - 1)``:
    ``phi`` is convex and decreasing in ``tau`` (a p-norm, p >= 1, of non-negative convex functions),
    so Newton steps from a ``tau`` below the root stay below it and increase monotonically (each
    iterate keeps the sum >= 1, so its support contains the exact one). It is exact in one step when
    the support is right and ``e = 1`` (sparsemax) or ``e -> inf`` (softmax, where the norm tends to
    the max), quadratic near the root otherwise. Start: the larger of two lower bounds,
    ``max - 1`` (the largest term alone is 1) and ``mean - n ** (-1/e)`` (Jensen: the sum is at least
    ``n (mean - tau)^e``). One pass per step: ``y^e`` gives the sum, ``y^e / y`` the derivative. This
    replaces the ~25 bisection steps of the authors' ``entmax_bisect`` (Peters et al. 2019) by 3-7
    passes."""
    am1 = alpha - 1  # > 0
    n = x.shape[-1]
    top = x.amax(-1, keepdim=True)  # (..., 1)
    xs = (x - top) * am1  # (..., n) as _shifted: max 0
    top = top * am1  # the shift of tau
    lo = torch.clamp_min(xs.mean(-1, keepdim=True) - n ** (-am1), -1)  # (..., 1)
    expo = 1 / am1
    shrink = 2 - alpha  # f^(1 - 1/e)
    tiny, tol = torch.finfo(x.dtype).tiny, 8 * torch.finfo(x.dtype).eps
    # (..., n) two buffers reused by every step; none under torch.func, whose vmap has no batching
    # rule for out= (relu_ and clamp_min_ have one)
    fixed = _fixed_steps()
    buf_y = buf_w = None
    if not torch._C._are_functorch_transforms_active():
        buf_y, buf_w = torch.empty_like(x), torch.empty_like(x)
    for i in range(max_steps):
        y = torch.sub(xs, lo, out=buf_y).relu_()
        w = torch.pow(y, expo, out=buf_w)  # y^e
        total = w.sum(-1, keepdim=True)
        if i == max_steps - 1:
            break
        # y^(e-1) on the support, 0 off it (not pow(y, e - 1): 0^0 = 1 at alpha = 2)
        slope = torch.div(w, y.clamp_min_(tiny), out=buf_y).sum(-1, keepdim=True)  # -phi' / f^(1/e-1)
        step = (total - total.pow(shrink)) / slope  # -phi / phi'
        # rounding of the threshold in the scores' own scale (that of the unshifted tau)
        if not fixed and bool((step.abs() <= tol * (1 + (lo + top).abs())).all()):
            break
        lo = lo + step
    return lo, total, w


def _shifted(x: torch.Tensor, am1: torch.Tensor) -> torch.Tensor:
    """``(alpha - 1) (x - max x)`` over the last dim: at most 0, and exactly 0 at the max."""
    return (x - x.amax(-1, keepdim=True)) * am1


def _probs(x: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``[(alpha - 1) (x - max x) - tau]_+ ^ (1 / (alpha - 1))`` normalised to sum to one (``tau``
    and ``total`` from :func:`_threshold`). In place on temporaries: not for a graph."""
    y = _shifted(x, alpha - 1).sub_(tau).relu_()
    if torch._C._are_functorch_transforms_active():  # vmap has no batching rule for pow_
        return y.pow(1 / (alpha - 1)).div_(total)
    return y.pow_(1 / (alpha - 1)).div_(total)


def _backward(p: torch.Tensor, dp: torch.Tensor, alpha: torch.Tensor,
              need_alpha: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``p = entmax_alpha(x)`` over the last dim: ``(dL/dx, dL/dalpha per row)``.

    With ``g = p ^ (2 - alpha)`` on the support (0 off it): ``dL/dx = g * dp - g * <g, dp> / sum(g)``;
    and ``dp/dalpha = (p - g~) / (alpha - 1)^2 - (p log p - g~ sum(p log p)) / (alpha - 1)`` with
    ``g~ = g / sum(g)`` (Peters et al. 2019 for x; Correia et al. 2019, Proposition 1, for alpha)."""
    on = p > 0
    g = torch.where(on, p.clamp(min=torch.finfo(p.dtype).tiny).pow(2 - alpha), 0.0)
    g_sum = g.sum(-1, keepdim=True)
    dx = g * dp - g * (g * dp).sum(-1, keepdim=True) / g_sum
    if not need_alpha:
        return dx, None
    am1 = alpha - 1
    plogp = torch.where(on, p * p.clamp(min=torch.finfo(p.dtype).tiny).log(), 0.0)
    g_norm = g / g_sum
    dp_dalpha = (p - g_norm) / am1 ** 2 - (plogp - g_norm * plogp.sum(-1, keepdim=True)) / am1
    return dx, (dp * dp_dalpha).sum(-1, keepdim=True)


class _EntmaxBisect(torch.autograd.Function):
    """alpha-entmax over the last dim with the closed-form gradient for ``x`` and ``alpha``."""

    generate_vmap_rule = True  # forward and backward are batchable: vmap and torch.func work

    @staticmethod
    def forward(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        _tau, total, w = _threshold(x, alpha, _max_steps(x.dtype))
        return w.div_(total)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(output, inputs[1])

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        p, alpha = ctx.saved_tensors
        dx, d_alpha = _backward(p, dp, alpha, ctx.needs_input_grad[1])
        if d_alpha is not None:  # reduce over what alpha was broadcast over
            d_alpha = d_alpha.sum_to_size(alpha.shape)
        return dx, d_alpha


def entmax_bisect(x: torch.Tensor, alpha: torch.Tensor | float = 1.5) -> torch.Tensor:
    """alpha-entmax of ``x`` over its last dim: ``argmax_p <p, x> + H^T_alpha(p)`` over the simplex,
    ``p_i = [(alpha - 1) x_i - tau]_+ ^ (1 / (alpha - 1))`` with ``tau`` found by monotone
    Newton steps from below (the fixed point of the bisection of Peters et al. 2019; the name is
    kept).

    ``alpha`` in ``(1, 2]`` (a float or a tensor broadcastable to ``x[..., :1]``, e.g. one per head):
    2 is sparsemax, 1.5 the paper's default, and the map tends to softmax as alpha tends to 1
    (use ``alpha >= 1.01``). Differentiable in ``x`` and in a tensor ``alpha`` (closed-form
    gradients, not autograd through the iterations), twice too (the gradient is written in
    differentiable operations: gradient penalties work). Any magnitude of ``x``: the threshold is
    found on scores shifted by their max, so scores of 1e8 in float32 give the (near one-hot)
    entmax, not NaN."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"entmax_bisect expects a floating-point tensor, got {type(x).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.Tensor)):
        raise TypeError(f"entmax_bisect: alpha must be a number or a tensor, got {type(alpha).__name__}")
    if not isinstance(alpha, torch.Tensor):
        if not 1 < alpha <= 2:
            raise ValueError(f"entmax_bisect: alpha must be in (1, 2], got {alpha}")
        alpha = torch.tensor(float(alpha), dtype=x.dtype, device=x.device)
    return _EntmaxBisect.apply(x, alpha.to(x.dtype))


def _query_step(q: torch.Tensor, k: torch.Tensor) -> int:
    """Queries per chunk: about ``CHUNK_ELEMENTS`` scores ``(B, heads, step, S)`` at a time."""
    return max(1, CHUNK_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[2]))


class _EntmaxAttention(torch.autograd.Function):
    """``entmax_alpha(q k^T) v`` per head, over chunks of queries; the backward recomputes each
    chunk's probabilities from the saved thresholds (no L x S matrix is kept for it), or, when it
    builds a graph (double backward), by :class:`_EntmaxBisect` in differentiable operations.
    Returns the output and the thresholds and sums it saves (no gradient)."""

    generate_vmap_rule = True  # forward and backward are batchable: vmap and torch.func work

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # q (B, heads, L, d), already scaled; k, v (B, heads, S, d); alpha (1, heads, 1, 1)
        length, step = q.shape[2], _query_step(q, k)
        max_steps = _max_steps(q.dtype)
        outs, taus, totals = [], [], []
        for start in range(0, length, step):
            x = q[:, :, start:start + step] @ k.transpose(-2, -1)  # (B, heads, l, S)
            tau, total, w = _threshold(x, alpha, max_steps)
            outs.append(w.div_(total) @ v)
            taus.append(tau)
            totals.append(total)
        tau, total = torch.cat(taus, 2), torch.cat(totals, 2)  # (B, heads, L, 1)
        return torch.cat(outs, 2), tau, total

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        _out, tau, total = output
        ctx.mark_non_differentiable(tau, total)
        ctx.save_for_backward(*inputs, tau, total)

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _d_tau: torch.Tensor, _d_total: torch.Tensor):
        q, k, v, alpha, tau, total = ctx.saved_tensors
        step = _query_step(q, k)
        need_alpha = ctx.needs_input_grad[3]
        # A backward that builds a graph (create_graph=True: a gradient penalty; torch.func.grad)
        # recomputes the weights by _EntmaxBisect, whose output carries the dependence of the
        # threshold on the scores (the saved tau would hold it constant) and whose backward is in
        # differentiable operations; every step here is out of place. Otherwise the weights come
        # from the saved thresholds, in place.
        graph = torch.is_grad_enabled()
        dqs, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
        d_alpha = torch.zeros_like(alpha)
        for start in range(0, q.shape[2], step):
            rows = slice(start, start + step)
            x = q[:, :, rows] @ k.transpose(-2, -1)  # (B, heads, l, S)
            if graph:
                p = _EntmaxBisect.apply(x, alpha)
            else:
                p = _probs(x, alpha, tau[:, :, rows], total[:, :, rows])
            dv = dv + p.transpose(-2, -1) @ dout[:, :, rows]
            dx, da = _backward(p, dout[:, :, rows] @ v.transpose(-2, -1), alpha, need_alpha)
            dqs.append(dx @ k)
            dk = dk + dx.transpose(-2, -1) @ q[:, :, rows]
            if da is not None:
                d_alpha = d_alpha + da.sum((0, 2), keepdim=True)
        dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, 2)
        return dq, dk, dv, d_alpha if need_alpha else None


class AdaptiveSparseAttention(AttentionBlock):
    """``x + proj(MHA(x))`` with softmax replaced by alpha-entmax, alpha learned per head.

    What adapts: each query's *support*, the set of keys it gives non-zero weight, is decided by the
    content: keys whose score falls below the query's threshold ``tau`` get exactly zero. How many
    survive depends on the spread of the query's scores and on its head's alpha: alpha near 1 acts
    like softmax (dense), alpha = 2 is sparsemax (sparsest); alpha is learned per head, so each
    head chooses how sparse to be (the paper's finding: heads specialise, some dense, some sparse).
    How it is measured: :meth:`sparsity` returns, per head, the fraction of query-key weights
    that are exactly zero for an input; ``alpha`` holds the current alpha of each head.

    ``alpha = clamp(1 + sigmoid(alpha_logit), 1.01, 2)`` as in the authors' code, with the logit
    starting at 0 (alpha = 1.5, the paper's initial value). The weights come from Newton steps on
    the threshold, from below (see ``_threshold``: the same fixed point as the ``entmax_bisect``
    bisection in 3-7 passes over the scores instead of 25); the backward uses the closed-form
    entmax gradients for the scores and for alpha (not autograd through the iterations),
    recomputing each chunk of queries' weights from the saved thresholds, so memory stays O(P)
    beyond one chunk. A backward that builds a graph (``create_graph=True``, a gradient penalty)
    recomputes the weights differentiably instead, so the block is differentiable twice. Time is O(P^2 d) plus a few passes over the scores:
    a dense-cost block, for small maps. Queries and keys get the 2-D sin-cos positions as in
    ``mhsa``.

    Args:
        channels: input channels C.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projection.
        pos_embed: ``"sincos"`` or ``"none"``.
    """

    def __init__(self, channels: int, *, heads: int | None = None, qkv_bias: bool = True,
                 pos_embed: str = "sincos", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = "AdaptiveSparseAttention"
        check_pos_embed(pos_embed, name)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, name)
        self.pos_embed = pos_embed
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=qkv_bias, **dd)
        self.proj = nn.Conv2d(channels, channels, 1, **dd)
        self.alpha_logit = nn.Parameter(torch.zeros(self.heads, **dd))

    @property
    def alpha(self) -> torch.Tensor:
        """``(heads,)`` the alpha of each head, in ``[1.01, 2]``."""
        return (1 + torch.sigmoid(self.alpha_logit)).clamp(ALPHA_MIN, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, heads, HW, d)`` queries (already scaled by ``d ** -0.5``), keys and values."""
        q, k, v = project_qkv(self.qkv, x, self.heads, self.pos_embed)  # (N, heads, HW, d)
        return q * (x.shape[1] // self.heads) ** -0.5, k, v

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self._qkv(x)
        alpha = self.alpha.view(1, -1, 1, 1)
        if q.dtype in (torch.float16, torch.bfloat16):  # the threshold needs float32 resolution
            q, k, v, alpha = q.float(), k.float(), v.float(), alpha.float()
        with torch.autocast(x.device.type, enabled=False):
            y = _EntmaxAttention.apply(q, k, v, alpha.to(q.dtype))[0]  # (N, heads, HW, d)
            if self._capture is not None:
                self._record(q, k, alpha.to(q.dtype), h, w)
        y = y.transpose(-2, -1).reshape(n, c, h, w).to(x.dtype)
        return torch.add(x, F.conv2d(y, self.proj.weight, self.proj.bias), out=out)

    def _weights(self, q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor):
        """Yield ``(start, p)``: the entmax weights ``(N, heads, l, HW)`` of chunks of queries."""
        step = _query_step(q, k)
        for start in range(0, q.shape[2], step):
            x = q[:, :, start:start + step] @ k.transpose(-2, -1)
            _tau, total, w = _threshold(x, alpha, _max_steps(x.dtype))
            yield start, w.div_(total)

    @torch.no_grad()
    def sparsity(self, x: torch.Tensor) -> torch.Tensor:
        """``(heads,)`` the fraction of query-key weights that are exactly zero, per head, for the
        input ``x`` ``(N, C, H, W)`` (0 for softmax attention; ``1 - 1/HW`` when every query keeps
        one key)."""
        check_input(x, self.channels, type(self).__name__, self.alpha_logit.dtype)
        q, k, _ = self._qkv(x)
        if q.dtype in (torch.float16, torch.bfloat16):  # as the forward: the threshold in float32
            q, k = q.float(), k.float()
        zeros = torch.zeros(self.heads, device=x.device, dtype=torch.float64)
        alpha = self.alpha.view(1, -1, 1, 1).to(q.dtype)
        with torch.autocast(x.device.type, enabled=False):  # as the forward: scores not in bf16
            for _, p in self._weights(q, k, alpha):
                zeros += (p == 0).sum((0, 2, 3)).double()
        return (zeros / (q.shape[0] * q.shape[2] * k.shape[2])).float()

    def _record(self, q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, h: int, w: int) -> None:
        """Store "received" and "query" maps (explain only)."""
        n = q.shape[0]
        received = torch.zeros(n, h * w, device=q.device)
        qi = self._capture.query_index(h, w)
        for start, p in self._weights(q.detach(), k.detach(), alpha.detach()):
            received += p.float().mean(1).sum(1)
            if qi is not None and start <= qi < start + p.shape[2]:
                self._capture.add("query", p[:, :, qi - start].float().mean(1).view(n, h, w))
        self._capture.add("received", received.view(n, h, w) / (h * w))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, pos_embed={self.pos_embed!r}"
