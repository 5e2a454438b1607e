"""Criss-cross attention: each position attends to the positions in its row and its column under
one joint softmax; applied twice (recurrence) every position reaches the whole map.

Paper: Huang, Wang, Huang, Huang, Wei, Liu. "CCNet: Criss-Cross Attention for Semantic
Segmentation", ICCV 2019. https://arxiv.org/abs/1811.11721
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, check_int

__all__ = ["CrissCrossAttention"]


class CrissCrossAttention(AttentionBlock):
    """``x + gamma * sum_{j in row(i) u col(i)} softmax_j(q_i . k_j) v_j``, ``recurrence`` times
    with shared weights (paper: R = 2). ``gamma`` starts at zero, so the block starts as identity.

    The energies are two einsums of shape ``(N, H, W, H)`` and ``(N, H, W, W)``; the position
    itself appears in both its row and its column and is counted once (masked in the column).
    Memory is O(HW (H + W)); no HW x HW matrix and no custom kernel.

    Captured (:mod:`visattn.explain`): each pass's one-hop attention over the row and column of
    every query (``"received"``: summed over queries, divided by H*W; ``"query"``: the query
    point's cross), averaged over the ``recurrence`` passes (not composed into their reach).

    Args:
        channels: input channels C.
        reduction: query/key width C // reduction (paper: 8).
        recurrence: number of criss-cross passes (paper: 2).
    """

    def __init__(self, channels: int, *, reduction: int = 8, recurrence: int = 2,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "CrissCrossAttention")
        check_int(reduction, "reduction", "CrissCrossAttention")
        self.recurrence = check_int(recurrence, "recurrence", "CrissCrossAttention")
        dd = {"device": device, "dtype": dtype}
        qk = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk, 1, **dd)
        self.key = nn.Conv2d(channels, qk, 1, **dd)
        self.value = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def _record(self, a_col: torch.Tensor, a_row: torch.Tensor) -> None:
        """``a_col`` ``(N, H, W, H')``: query (h, w) -> key (h', w); ``a_row`` ``(N, H, W, W')``:
        query (h, w) -> key (h, w')."""
        n, h, w, _ = a_row.shape
        received = (a_col.sum(1).transpose(1, 2) + a_row.sum(2)) / (h * w)  # (N, H, W)
        self._capture.add("received", received)
        qi = self._capture.query_index(h, w)
        if qi is not None:
            qy, qx = divmod(qi, w)
            m = a_row.new_zeros(n, h, w)
            m[:, :, qx] += a_col[:, qy, qx]
            m[:, qy, :] += a_row[:, qy, qx]
            self._capture.add("query", m)

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of criss-cross aggregation (without residual and gamma): ``(N, C, H, W)``."""
        h = x.shape[2]
        q, k, v = self.query(x), self.key(x), self.value(x)
        e_col = torch.einsum("nchw,ncgw->nhwg", q, k)  # (N, H, W, H): same column
        e_row = torch.einsum("nchw,nchg->nhwg", q, k)  # (N, H, W, W): same row
        self_in_col = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]  # (H, 1, H)
        e_col = e_col.masked_fill(self_in_col, float("-inf"))
        a = torch.cat([e_col, e_row], -1).softmax(-1)  # joint softmax over H + W
        a_col, a_row = a.split([h, x.shape[3]], -1)
        if self._capture is not None:
            self._record(a_col, a_row)
        return torch.einsum("nhwg,ncgw->nchw", a_col, v) + torch.einsum("nhwg,nchg->nchw", a_row, v)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = x
        for _ in range(self.recurrence):
            y = y + self.gamma * self.aggregate(y)  # the module's residual is its own input
        return y if out is None else out.copy_(y)
