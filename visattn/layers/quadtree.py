"""QuadTree attention: full attention on a coarse copy of the map, then, level by level, each query
attends only to the 2x2 children of the ``topk`` tokens its parent attended to most, so the cost
is linear in the positions while every query still sees the whole map.

Paper: Tang, Zhang, Zhu, Tan. "QuadTree Attention for Vision Transformers", ICLR 2022.
https://arxiv.org/abs/2201.02767
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import GATHER_BYTES, RowChunks, check_heads
from ._base import AttentionBlock, check_int
from ._depthwise import depthwise_conv

__all__ = ["QuadtreeAttention"]


def _pool2(t: torch.Tensor) -> torch.Tensor:
    """Sum over 2x2 cells: ``(N, 2h, 2w, C)`` -> ``(N, h, w, C)``. Three adds of strided quarters,
    each vectorised over the contiguous channels (a ``sum`` over the two cell dimensions reduces
    across strides and is several times slower on large maps)."""
    return (t[:, 0::2, 0::2] + t[:, 0::2, 1::2]) + (t[:, 1::2, 0::2] + t[:, 1::2, 1::2])


def _up2(t: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling: ``(N, h, w, C)`` -> ``(N, 2h, 2w, C)``."""
    n, h, w, c = t.shape
    return t[:, :, None, :, None].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)


def _add_up2(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``fine + _up2(coarse)`` in one broadcast add, without materialising the upsampled map."""
    n, h2, w2, c = fine.shape
    return (fine.view(n, h2 // 2, 2, w2 // 2, 2, c) + coarse[:, :, None, :, None]).view(n, h2, w2, c)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, h, w, C)`` -> ``(N, heads, h * w, C / heads)``, row-major positions."""
    n, h, w, c = t.shape
    return t.reshape(n, h * w, heads, c // heads).transpose(1, 2)


def _by_parent(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, 2h, 2w, C)`` -> ``(N, heads, h * w, 4, C / heads)``: the 2x2 children of each parent."""
    n, h2, w2, c = t.shape
    t = t.view(n, h2 // 2, 2, w2 // 2, 2, heads, c // heads).permute(0, 5, 1, 3, 2, 4, 6)
    return t.reshape(n, heads, (h2 // 2) * (w2 // 2), 4, c // heads)


def _from_parent(t: torch.Tensor, h2: int, w2: int) -> torch.Tensor:
    """Inverse of :func:`_by_parent` for ``(N, heads, h * w, 4, D)`` -> ``(N, 2h, 2w, heads * D)``."""
    n, heads, _, _, d = t.shape
    t = t.view(n, heads, h2 // 2, w2 // 2, 2, 2, d).permute(0, 2, 4, 3, 5, 1, 6)
    return t.reshape(n, h2, w2, heads * d)


def _child_rows(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """The keys and values of a level laid out by parent: ``kv`` ``(N, 2h, 2w, 2C)`` (keys then
    values) -> ``(N * heads * h * w, 4 * 2 * C / heads)``, one row per parent and head holding its
    2x2 children (row-major), keys then values. Rows are taken with ``index_select``, whose backward
    is a contiguous ``index_add`` (``torch.gather`` over an index expanded to the channels is far
    slower to differentiate on CPU)."""
    n, h2, w2, c2 = kv.shape
    d = c2 // (2 * heads)
    rows = kv.view(n, h2 // 2, 2, w2 // 2, 2, 2, heads, d).permute(0, 6, 1, 3, 2, 4, 5, 7)
    return rows.reshape(n * heads * (h2 // 2) * (w2 // 2), 4 * 2 * d)


class QuadtreeAttention(AttentionBlock):
    """``x + proj(m)`` with ``m`` the quadtree message of the paper (Sec. 3.2-3.3).

    Queries, keys and values (one 1x1 projection) are averaged over 2x2 cells into ``levels``
    maps, the coarsest ``2^(levels-1)`` times smaller. At the coarsest level every query attends to
    every key (softmax). Each query keeps the ``topk`` keys of highest attention; at the next finer
    level each of its four child queries attends only to the 2x2 children of those ``topk`` keys
    (``4 topk`` keys), keeps its own ``topk``, and so on down to the input resolution. The
    candidate keys come from one ``index_select`` on flattened rows (cheap backward).

    ``variant`` picks how the levels are scored and combined (both from the authors' code):

    * ``"b"`` (QuadTree-B, the paper's vision backbones; default): at each fine level one softmax over
      the ``4 topk`` candidate keys; every level's message (all its keys) plus a 3x3 depthwise
      LePE convolution of that level's values is weighted by ``softmax(level_weight)`` (learned,
      one per level) and the coarse messages are broadcast to their child queries and summed.
    * ``"a"`` (QuadTree-A): the score of each child key is its parent's score times a softmax over
      the parent's 4 children, so one distribution spans all levels; the message is the finest
      level's (all candidates) plus, at every coarser level, the keys that were *not* selected.

    With ``topk`` at least the number of candidates, every level of ``"b"`` is full attention at
    that level (so it is full attention at the input resolution when ``level_weight`` selects the
    finest level), and ``"a"`` is a hierarchical softmax over the whole map.

    Cost: ``O(P · 4 topk · d)`` per fine level and ``(P / 4^(levels-1))^2 · d`` at the coarsest, so
    linear in the positions ``P = H W`` while the coarsest map stays small (``levels=4``: 32x32
    coarse tokens at 256x256); raise ``levels`` for larger maps. Each fine level runs over chunks
    of parents whose gathered keys/values take about ``GATHER_BYTES`` (cache-sized), and the LePE
    convolutions take their CPU weight gradient over bands of rows
    (:func:`~visattn.layers._depthwise.depthwise_conv`); neither changes the result. Sides that are not multiples of
    ``2^(levels-1)`` are zero-padded at the bottom/right after the projection; coarse tokens average
    real tokens only, and padded tokens are never keys. A map smaller than ``2^(levels-1)`` is padded
    only to the next power of two: the levels above its 1x1 level would each hold one real token,
    the map's mean, so they are computed on that token (the same result, at no cost).

    Departure from the authors' B: the value pyramid is averaged like the queries and keys (their
    B models downsample values with a small learned conv branch).

    Args:
        channels: input channels C.
        levels: number of pyramid levels (>= 1; 1 is plain full attention).
        topk: keys kept per query at each level but the finest: one int for all, or one per level
            (``levels - 1`` values, coarsest first). The paper: 8 for its vision backbones.
        variant: ``"b"`` or ``"a"`` (see above).
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projection.
    """

    def __init__(self, channels: int, *, levels: int = 4, topk: int | Sequence[int] = 8,
                 variant: str = "b", heads: int | None = None, qkv_bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = "QuadtreeAttention"
        check_int(levels, "levels", name, high=16)
        if isinstance(topk, Sequence) and not isinstance(topk, str):
            topk = tuple(topk)
            for t in topk:
                check_int(t, "topk", name)
            if len(topk) != levels - 1:
                raise ValueError(f"{name}: topk needs one value per level but the finest "
                                 f"(levels - 1 = {levels - 1}), got {len(topk)}: {topk}")
        else:
            check_int(topk, "topk", name)
            topk = (topk,) * (levels - 1)
        if variant not in ("a", "b"):
            raise ValueError(f"{name}: variant must be 'a' or 'b', got {variant!r}")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, name)
        self.levels = levels
        self.topk = topk
        self.variant = variant
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        if variant == "b":
            self.level_weight = nn.Parameter(torch.zeros(levels, **dd))
            self.lepe = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, **dd)
                                      for _ in range(levels))
        else:
            self.level_weight = self.lepe = None

    def _levels_used(self, h: int, w: int) -> int:
        """The levels an ``h x w`` map is computed with: ``levels``, or fewer when the map is
        smaller than ``2^(levels-1)``. The coarser levels would each hold one real token, the
        mean of the whole map, and be padding elsewhere: see :meth:`_forward`."""
        return min(self.levels, 1 + (max(h, w) - 1).bit_length())

    def _pyramid(self, x: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
        """Per level (coarsest first): the ``(N, h_l, w_l, 3C)`` q/k/v map and the ``(1, h_l, w_l, 1)``
        count of real input tokens under each token; and the padded finest size."""
        h, w = x.shape[-2:]
        f = 2 ** (levels - 1)
        hp, wp = -(-h // f) * f, -(-w // f) * f
        qkv = self.qkv(x.permute(0, 2, 3, 1))  # (N, H, W, 3C)
        if hp != h or wp != w:  # pad after the projection: padded tokens are exact zeros
            qkv = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h))
        count = torch.zeros(1, hp, wp, 1, dtype=qkv.dtype, device=x.device)
        count[:, :h, :w] = 1
        maps, counts = [qkv], [count]
        for _ in range(levels - 1):  # sums of real tokens / their number: means of real tokens
            counts.append(_pool2(counts[-1]))
            maps.append(_pool2(maps[-1]))
        maps = [m / cnt.clamp(min=1) if i else m for i, (m, cnt) in enumerate(zip(maps, counts))]
        return maps[::-1], counts[::-1], hp, wp

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        scale = 1.0 / math.sqrt(d)
        used_levels = self._levels_used(h, w)
        skip = self.levels - used_levels  # coarsest levels not formed: the map is 1x1 before them
        maps, counts, hp, wp = self._pyramid(x, used_levels)
        record = [] if self._capture is not None else None
        acc = None  # (N, h_l, w_l, C): the message so far, at the current level's resolution
        if skip and self.variant == "b":
            # each skipped level is a map whose one real token (the mean of the map, which is the
            # 1x1 coarsest level formed) attends to itself: its message is that token's value plus
            # its LePE (3x3 on a map of zeros around it); "a" sends nothing from them (the one key
            # is always refined further)
            v_mean = maps[0][..., 2 * c:]  # (N, 1, 1, C)
            v_map = v_mean.permute(0, 3, 1, 2)
            lw = self.level_weight.softmax(0)
            acc = sum((v_mean + depthwise_conv(self.lepe[j], v_map).permute(0, 2, 3, 1)) * lw[j]
                      for j in range(skip))
            if record is not None:
                record += [(j, torch.ones(n, heads, 1, 1, dtype=x.dtype, device=x.device), None, counts[0])
                           for j in range(skip)]
        idx = score = None
        for lvl, (qkv, cnt) in enumerate(zip(maps, counts), start=skip):  # lvl: of all ``levels``
            hl, wl = qkv.shape[1:3]
            ok = cnt.view(hl * wl) > 0  # real tokens at this level
            low = torch.finfo(qkv.dtype).min  # finite: a row of masked keys is uniform, never NaN
            last = lvl == self.levels - 1
            if lvl == skip:  # full attention over the coarsest map
                q, k, v = (_heads(t, heads) for t in qkv.split(c, -1))  # (N, heads, S0, d)
                s = (q @ k.transpose(-2, -1)) * scale  # (N, heads, S0, S0)
                a = s.masked_fill(~ok, low).softmax(-1)
                cand = None
                if not last:
                    top = a.topk(min(self.topk[lvl], a.shape[-1]), -1)
                    idx, score = top.indices, top.values  # (N, heads, S0, k)
                used = a
                if self.variant == "a" and not last:  # coarse message: keys not refined further
                    used = a * torch.ones_like(a).scatter(-1, idx, 0.0)
                msg = (used @ v).transpose(1, 2).reshape(n, hl, wl, c)
            else:
                msg, idx, score, used, cand = self._fine_level(qkv, ok, idx, score, lvl, last)
            if self.variant == "b":
                v_map = qkv[..., 2 * c:].contiguous().permute(0, 3, 1, 2)  # channels-last memory
                lepe = depthwise_conv(self.lepe[lvl], v_map).permute(0, 2, 3, 1)  # (N, hl, wl, C)
                msg = (msg + lepe) * self.level_weight.softmax(0)[lvl]
            if acc is None:
                acc = msg
            elif lvl == skip:  # the skipped levels' messages, on the same 1x1 map
                acc = msg + acc
            else:  # the coarser message broadcast to the four children of each token
                acc = _add_up2(msg, acc)
            if record is not None:
                record.append((lvl, used, cand, cnt))
        if record is not None:
            self._record(record, n, h, w, hp, wp)
        y = self.proj(acc[:, :h, :w])  # (N, H, W, C)
        return torch.add(x, y.permute(0, 3, 1, 2), out=out)

    def _fine_level(self, qkv: torch.Tensor, ok: torch.Tensor, idx: torch.Tensor, score: torch.Tensor,
                    lvl: int, last: bool) -> tuple:
        """One level below the coarsest: each child query attends to the 2x2 children of its
        parent's kept keys. ``qkv`` ``(N, hl, wl, 3C)``, ``ok`` ``(hl * wl,)`` real tokens, ``idx``
        and ``score`` ``(N, heads, S', k)`` the parents' kept keys on the parent map (``S' = hl wl /
        4``) and their weights. Returns the message ``(N, hl, wl, C)``; the kept keys and weights of
        this level ``(N, heads, hl * wl, k')`` (``None`` at the finest); and the weights and
        candidate keys ``(N, heads, S', 4, 4k)`` / ``(N, heads, S', 4k)`` while capturing (else
        ``None``).

        The parents run in chunks whose gathered keys/values take about ``GATHER_BYTES``, so the
        gathered rows are read back from cache, not memory, on large maps (one chunk when
        compiling or capturing); every parent's result is the same either way."""
        n, hl, wl, c3 = qkv.shape
        c, heads = c3 // 3, self.heads
        d, k = c // heads, idx.shape[-1]
        scale = 1.0 / math.sqrt(d)
        low = torch.finfo(qkv.dtype).min  # finite: a row of masked keys is uniform, never NaN
        q = _by_parent(qkv[..., :c], heads)  # (N, heads, S', 4, d): children of each parent
        s_par = q.shape[2]
        total = n * heads * s_par
        q = q.reshape(total, 4, d)
        rows = _child_rows(qkv[..., c:], heads)  # (N*heads*S', [2x2 children, k|v, d])
        offset = torch.arange(n * heads, device=qkv.device).view(n, heads, 1, 1) * s_par
        rows_idx = (idx + offset).reshape(total, k)  # rows of the kept parents
        parents = idx.reshape(total, k)
        parent_score = score.reshape(total, k) if self.variant == "a" else None
        wp_ = wl // 2
        offs = torch.tensor([0, 1, wl, wl + 1], device=qkv.device)
        step = total
        if not torch.compiler.is_compiling() and self._capture is None:
            step = max(1, GATHER_BYTES // (k * 4 * 2 * d * qkv.element_size()))
        msgs, sels, vals, useds, cands = [], [], [], [], []
        source = RowChunks(rows, -(-total // step))
        for start in range(0, total, step):
            part = slice(start, start + step)
            pi = parents[part]
            base = 2 * (pi // wp_) * wl + 2 * (pi % wp_)  # top-left child of each kept key
            cand = (base[..., None] + offs).flatten(-2)  # (B, 4k): candidate keys on this level
            kvg = source.take(rows_idx[part].reshape(-1)).view(-1, 4 * k, 2, d)
            s = (q[part] @ kvg[..., 0, :].transpose(-2, -1)) * scale  # (B, 4, 4k)
            s = s.masked_fill(~ok[cand][:, None, :], low)
            if self.variant == "b":
                a = s.softmax(-1)
            else:  # parent's score times a softmax over its 4 children
                a = (s.unflatten(-1, (k, 4)).softmax(-1) * parent_score[part][:, None, :, None]).flatten(-2)
            used = a
            if not last:
                top = a.topk(min(self.topk[lvl], a.shape[-1]), -1)  # (B, 4, k')
                if self.variant == "a":
                    used = a * torch.ones_like(a).scatter(-1, top.indices, 0.0)
                sels.append(cand[:, None, :].expand(a.shape).gather(-1, top.indices))
                vals.append(top.values)
            msgs.append(used @ kvg[..., 1, :])  # (B, 4, d)
            if self._capture is not None:
                useds.append(used)
                cands.append(cand)

        def to_map(parts: list) -> torch.Tensor:  # (total, 4, X) pieces -> (N, hl, wl, heads * X)
            t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            return _from_parent(t.view(n, heads, s_par, 4, -1), hl, wl)

        msg = to_map(msgs)
        if not last:
            idx = to_map(sels).view(n, hl * wl, heads, -1).transpose(1, 2)
            score = to_map(vals).view(n, hl * wl, heads, -1).transpose(1, 2)
        used = cand = None
        if useds:
            used = useds[0].view(n, heads, s_par, 4, -1)
            cand = cands[0].view(n, heads, s_par, -1)
        return msg, idx, score, used, cand

    def _record(self, record: list, n: int, h: int, w: int, hp: int, wp: int) -> None:
        """Store "received" and "query" maps (explain only). Each level's weights (times the level's
        weight for ``"b"``) are scattered onto that level's keys, weighted by how many real input
        positions each query stands for, and a coarse key's weight is spread evenly over the real
        input positions under it."""
        level_w = self.level_weight.detach().softmax(0) if self.variant == "b" else None
        received = torch.zeros(n, hp, wp, device=record[0][1].device)
        qi = self._capture.query_index(h, w)
        query = torch.zeros_like(received) if qi is not None else None
        valid = torch.zeros(hp, wp, device=received.device)
        valid[:h, :w] = 1
        for lvl, used, cand, cnt in record:
            hl, wl = cnt.shape[1:3]
            f = hp // hl
            used = used.detach().float() * (1.0 if level_w is None else float(level_w[lvl]))
            cnt = cnt.view(hl * wl).float()
            if cand is None:  # (N, heads, S, S): rows are queries at this level
                q_weight = (used * cnt[:, None]).sum(2)  # (N, heads, S)
                mass = q_weight.mean(1)
                q_row = None
                if qi is not None:
                    yq, xq = divmod(qi, w)
                    q_row = used[:, :, (yq // f) * wl + xq // f].mean(1)  # (N, S)
            else:  # (N, heads, S', 4, 4k): the 4 child queries of each parent, over candidate keys
                wq = _by_parent(cnt.view(1, hl, wl, 1), 1)[:, 0, :, :, 0]  # (1, S', 4)
                per_key = (used * wq[:, None, :, :, None]).sum(3)  # (N, heads, S', 4k)
                mass = torch.zeros(n, used.shape[1], hl * wl, device=used.device)
                mass = mass.scatter_add_(2, cand.flatten(2), per_key.flatten(2)).mean(1)
                q_row = None
                if qi is not None:
                    yq, xq = divmod(qi, w)
                    yl, xl = yq // f, xq // f
                    parent, child = (yl // 2) * (wl // 2) + xl // 2, (yl % 2) * 2 + xl % 2
                    q_row = torch.zeros(n, used.shape[1], hl * wl, device=used.device)
                    q_row = q_row.scatter_add_(2, cand[:, :, parent], used[:, :, parent, child]).mean(1)
            received += self._spread(mass, cnt, hl, wl, f) * valid
            if q_row is not None:
                query += self._spread(q_row, cnt, hl, wl, f) * valid
        self._capture.add("received", received[:, :h, :w] / (h * w))
        if query is not None:
            self._capture.add("query", query[:, :h, :w])

    @staticmethod
    def _spread(m: torch.Tensor, cnt: torch.Tensor, hl: int, wl: int, f: int) -> torch.Tensor:
        """``(N, hl * wl)`` weights of level tokens -> ``(N, hl * f, wl * f)``, each token's weight
        shared evenly by the ``cnt`` real input positions under it (the caller zeroes padded ones)."""
        m = (m / cnt.clamp(min=1)).view(m.shape[0], hl, wl, 1)
        for _ in range(f.bit_length() - 1):  # f is a power of two
            m = _up2(m)
        return m[..., 0]

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, levels={self.levels}, topk={self.topk}, "
                f"variant={self.variant!r}, heads={self.heads}")
