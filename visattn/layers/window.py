"""Local windowed self-attention (sparse attention) with an optional cyclic shift between windows
and a learned relative position bias, Swin-style.

Paper: Liu, Lin, Cao, Hu, Wei, Zhang, Lin, Guo. "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows", ICCV 2021. https://arxiv.org/abs/2103.14030
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import attend, attention_probs, check_heads, merge_heads, split_heads
from ._base import AttentionBlock, check_int

__all__ = ["WindowAttention"]


def _partition(t: torch.Tensor, ws: int) -> torch.Tensor:
    """``(N, Hp, Wp, C)`` -> ``(N * nW, ws * ws, C)``, windows in row-major order."""
    n, hp, wp, c = t.shape
    t = t.view(n, hp // ws, ws, wp // ws, ws, c).transpose(2, 3)
    return t.reshape(-1, ws * ws, c)


def _unpartition(t: torch.Tensor, ws: int, n: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`_partition`."""
    c = t.shape[-1]
    t = t.view(n, hp // ws, wp // ws, ws, ws, c).transpose(2, 3)
    return t.reshape(n, hp, wp, c)


class WindowAttention(AttentionBlock):
    """``x + proj(W-MSA(x))`` over non-overlapping ``window_size``-square windows.

    Maps whose sides are not multiples of the window are zero-padded at the bottom/right and the
    padded positions are masked out as keys. With ``shift=True`` the map is rolled by half a
    window first and keys from a different region of the rolled map are masked out, as in Swin's
    SW-MSA; no shift is applied when one window covers the whole (padded) map.

    Memory is O(HW * window_size^2): a 256x256 map never forms a 65k x 65k matrix.

    Captured (:mod:`visattn.explain`): each query attends only inside its window, so
    ``"received"`` is the within-window attention every position receives from the (real, not
    padded) queries of its window, scattered back to the map and divided by H*W (a distribution
    over the map; each window holds its queries' share); ``"query"`` is the query point's row over
    its own window, zero outside it. Both average the heads and undo the shift.

    Args:
        channels: input channels C.
        window_size: side of the square window (Swin: 7).
        shift: shift windows by ``window_size // 2`` (SW-MSA).
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projection.
    """

    chunked_inference = False  # windows already bound the working set

    def __init__(self, channels: int, *, window_size: int = 7, shift: bool = False,
                 heads: int | None = None, qkv_bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(window_size, "window_size", "WindowAttention")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.window_size = window_size
        self.shift = shift
        self.heads = check_heads(channels, heads, "WindowAttention")
        self.reference = False
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        span = 2 * window_size - 1
        self.rel_bias = nn.Parameter(torch.zeros(span * span, self.heads, **dd))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing="ij")).flatten(1)  # (2, ws*ws)
        rel = coords[:, :, None] - coords[:, None, :] + window_size - 1  # (2, L, L), each in [0, span)
        self.register_buffer("rel_index", rel[0] * span + rel[1], persistent=False)

    def relative_bias(self) -> torch.Tensor:
        """``(heads, L, L)`` bias of each query-key offset inside a window."""
        length = self.window_size ** 2
        return self.rel_bias[self.rel_index.view(-1)].view(length, length, -1).permute(2, 0, 1)

    def _mask(self, h: int, w: int, hp: int, wp: int, s: int, device) -> torch.Tensor | None:
        """``(nW, 1, L, L)`` additive mask (-inf: other shift region or padding), or None."""
        if s == 0 and hp == h and wp == w:
            return None
        ws = self.window_size
        region = torch.zeros(hp, wp, dtype=torch.long, device=device)
        if s:
            bounds = ((0, hp - ws), (hp - ws, hp - s), (hp - s, hp))
            bounds_w = ((0, wp - ws), (wp - ws, wp - s), (wp - s, wp))
            for i, (y0, y1) in enumerate(bounds):
                for j, (x0, x1) in enumerate(bounds_w):
                    region[y0:y1, x0:x1] = 3 * i + j
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
        valid[:h, :w] = True
        valid = valid.roll((-s, -s), (0, 1))  # same roll as the features
        region = _partition(region[None, ..., None], ws).squeeze(-1)  # (nW, L)
        valid = _partition(valid[None, ..., None], ws).squeeze(-1)  # (nW, L)
        allowed = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
        allowed |= torch.eye(ws * ws, dtype=torch.bool, device=device)  # never an empty row
        mask = torch.zeros(allowed.shape, device=device)
        return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)

    def _record(self, p: torch.Tensor, n: int, h: int, w: int, hp: int, wp: int, s: int) -> None:
        """Scatter the within-window probabilities ``p`` ``(N * nW, heads, L, L)`` back to the map."""
        ws, hw = self.window_size, h * w
        idx = torch.full((hp, wp), hw, dtype=torch.long, device=p.device)  # hw: a padding slot
        idx[:h, :w] = torch.arange(hw, device=p.device).view(h, w)
        if s:
            idx = idx.roll((-s, -s), (0, 1))  # same roll as the features
        idx = _partition(idx[None, ..., None], ws).squeeze(-1)  # (nW, L): map position of each slot
        p = p.view(n, -1, *p.shape[1:]).mean(2)  # (N, nW, L, L), mean over heads
        real = (idx < hw).to(p.dtype)  # padded queries are not counted
        received = p.new_zeros(n, hw + 1).index_add_(1, idx.flatten(), (p * real[..., None]).sum(2).flatten(1))
        self._capture.add("received", received[:, :hw].view(n, h, w) / hw)
        qi = self._capture.query_index(h, w)
        if qi is not None:
            win, slot = divmod(int((idx.flatten() == qi).nonzero()[0]), ws * ws)
            row = p.new_zeros(n, hw + 1).index_add_(1, idx[win], p[:, win, slot])
            self._capture.add("query", row[:, :hw].view(n, h, w))

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        s = ws // 2 if self.shift and min(hp, wp) > ws else 0
        t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, wp - w, 0, hp - h))  # (N, Hp, Wp, C)
        if s:
            t = t.roll((-s, -s), (1, 2))
        tokens = _partition(t, ws)  # (N*nW, L, C)
        q, k, v = (split_heads(z, self.heads) for z in self.qkv(tokens).chunk(3, -1))
        bias = self.relative_bias().to(q.dtype)  # (heads, L, L)
        mask = self._mask(h, w, hp, wp, s, x.device)
        if mask is not None:  # (nW, heads, L, L), repeated over the batch
            bias = (bias + mask.to(q.dtype)).repeat(n, 1, 1, 1)
        if self._capture is not None:
            self._record(attention_probs(q, k, mask=bias), n, h, w, hp, wp, s)
        y = self.proj(merge_heads(attend(q, k, v, mask=bias, reference=self.reference)))  # (N*nW, L, C)
        y = _unpartition(y, ws, n, hp, wp)
        if s:
            y = y.roll((s, s), (1, 2))
        y = y[:, :h, :w].permute(0, 3, 1, 2)
        return torch.add(x, y, out=out)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, window_size={self.window_size}, shift={self.shift}, "
                f"heads={self.heads}")
