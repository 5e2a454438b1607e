"""Efficient attention: normalise queries over channels and keys over positions, then multiply
keys and values first, so the cost is linear in the number of positions.

Paper: Shen, Zhang, Zhao, Yi, Li. "Efficient Attention: Attention with Linear Complexities",
WACV 2021. https://arxiv.org/abs/1812.01243
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import check_heads
from ._base import AttentionBlock, check_int

__all__ = ["LinearAttention"]


class LinearAttention(AttentionBlock):
    """``x + proj(rho_q(Q) (rho_k(K)^T V))`` per head, with ``rho_q`` a softmax over each query's
    channels and ``rho_k`` a softmax over the positions of each key channel (eq. 4 of the paper).

    Time O(HW d^2) and memory O(HW d + d^2) per head: 4x the positions cost 4x.

    Captured (:mod:`visattn.explain`): the attention matrix the block applies implicitly,
    ``A = rho_q(Q)^T rho_k(K)`` (each row sums to 1, since ``rho_q`` sums to 1 over channels and
    ``rho_k`` over positions); ``"received"`` is its mean over queries and ``"query"`` the query
    point's row, heads averaged, computed in O(HW d) without forming ``A``.

    Args:
        channels: input channels C.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        key_channels: width of queries/keys (default C).
    """

    def __init__(self, channels: int, *, heads: int | None = None, key_channels: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = check_heads(channels, heads, "LinearAttention")
        self.channels = channels
        self.key_channels = check_int(key_channels, "key_channels", "LinearAttention", optional=True) or channels
        if self.key_channels % self.heads:
            raise ValueError(f"LinearAttention: heads={self.heads} must divide key_channels={self.key_channels}")
        self.query = nn.Conv2d(channels, self.key_channels, 1, **dd)
        self.key = nn.Conv2d(channels, self.key_channels, 1, **dd)
        self.value = nn.Conv2d(channels, channels, 1, **dd)
        self.proj = nn.Conv2d(channels, channels, 1, **dd)

    def _record(self, q: torch.Tensor, k: torch.Tensor, h: int, w: int) -> None:
        """The implied matrix ``A = rho_q(Q)^T rho_k(K)`` (``A_ij = sum_d q_di k_dj``), without forming it."""
        n, heads = q.shape[:2]
        received = torch.einsum("nhd,nhdj->nj", q.mean(3), k) / heads  # mean_i A_ij, heads averaged
        self._capture.add("received", received.view(n, h, w))
        qi = self._capture.query_index(h, w)
        if qi is not None:
            self._capture.add("query", (torch.einsum("nhd,nhdj->nj", q[..., qi], k) / heads).view(n, h, w))

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).view(n, self.heads, -1, h * w).softmax(2)  # (N, heads, dk, HW): over channels
        k = self.key(x).view(n, self.heads, -1, h * w).softmax(3)  # (N, heads, dk, HW): over positions
        v = self.value(x).view(n, self.heads, -1, h * w)  # (N, heads, dv, HW)
        if self._capture is not None:
            self._record(q.float(), k.float(), h, w)
        context = k @ v.transpose(-2, -1)  # (N, heads, dk, dv): global context vectors
        y = (context.transpose(-2, -1) @ q).reshape(n, c, h, w)  # (N, C, H, W)
        return torch.add(x, F.conv2d(y, self.proj.weight, self.proj.bias), out=out)
