"""Bi-level routing attention: every region of the map picks the ``topk`` regions most related to
it from a coarse region-to-region affinity, and its tokens then attend, token to token, only to the
tokens of those regions; a depthwise convolution on the values adds local context.

Paper: Zhu, Wang, Ke, Zhang, Lau. "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023. https://arxiv.org/abs/2303.08125
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import GATHER_BYTES, RowChunks, attend, check_heads
from ._base import AttentionBlock, check_int, check_odd
from ._depthwise import depthwise_conv

__all__ = ["BiLevelRoutingAttention"]


def _to_regions(t: torch.Tensor, sh: int, rh: int, sw: int, rw: int) -> torch.Tensor:
    """``(N, sh * rh, sw * rw, C)`` -> ``(N, sh * sw, rh * rw, C)``, regions and their tokens in
    row-major order."""
    n, c = t.shape[0], t.shape[-1]
    t = t.view(n, sh, rh, sw, rw, c).transpose(2, 3)  # (N, sh, sw, rh, rw, C)
    return t.reshape(n, sh * sw, rh * rw, c)


def _from_regions(t: torch.Tensor, sh: int, rh: int, sw: int, rw: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`."""
    n, c = t.shape[0], t.shape[-1]
    t = t.view(n, sh, sw, rh, rw, c).transpose(2, 3)  # (N, sh, rh, sw, rw, C)
    return t.reshape(n, sh * rh, sw * rw, c)


class BiLevelRoutingAttention(AttentionBlock):
    """``x + proj(BRA(x) + LCE(v))``: bi-level routing attention (the paper's Algorithm 1).

    1. ``q, k, v`` by one 1x1 projection; the map is cut into a grid of regions.
    2. Region level: ``A_r = mean(q)_r · mean(k)_r^T`` over regions (means over each region's real
       tokens); each region keeps the ``topk`` regions of highest affinity (a hard, content-chosen
       routing; the indices carry no gradient, as in the authors' default).
    3. Token level: each token attends with multi-head softmax attention to the tokens of its
       region's ``topk`` regions only; the gathered keys/values come from one ``index_select`` on
       the region-major key/value tensor, whose backward is a contiguous ``index_add`` (the
       authors' ``torch.gather`` over an expanded index is the slow backward of BiFormer issue #50).
    4. Local context enhancement: a ``lce_kernel`` x ``lce_kernel`` depthwise convolution of ``v``
       (as a map) is added to the attention output before the output projection, as the authors do.

    The grid is either ``regions`` x ``regions`` (the paper's ``S``; region sides ``ceil(H / S)``,
    ``ceil(W / S)``), so cost grows as ``P^2 topk / S^2``, or, with ``region_size``, square regions
    of that many tokens a side (``S`` grows with the map), so cost is ``O(P · topk · region_size^2)``:
    linear in the positions ``P = H W``. Sides that are not multiples of the region are
    zero-padded at the bottom/right; padded tokens are never keys, their regions are never
    preferred over real ones, and region means count real tokens only, so the result does not
    depend on the padding. Regions of padding only are not formed (with ``regions=S``, a side of
    ``n`` tokens gets ``ceil(n / ceil(n / S))`` regions, which can be fewer than ``S``: 9 rows and
    ``S=4`` give 3 regions of 3; a ``region_size`` above the map's side is cut to it): they would
    never be attended, so the result is the same and a large ``S`` costs nothing. ``topk`` above
    the number of regions means all of them: then every token attends to every token and the
    block is full attention plus the LCE term.

    Departure: the token-level softmax uses the per-head scale ``head_dim ** -0.5`` (the authors use
    ``C ** -0.5`` for every head); the routing uses ``C ** -0.5`` (it only ranks, so the scale does
    not change the choice).

    Args:
        channels: input channels C.
        regions: regions per side ``S`` (the paper's form); exclusive with ``region_size``.
        region_size: side of a region in tokens (linear cost); the default when neither is given is
            ``region_size=8``.
        topk: regions each region attends to (the paper: 1, 4, 16, S^2 over its four stages).
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projection.
        lce_kernel: odd kernel size of the depthwise local context convolution (the paper: 5).
    """

    chunked_inference = False  # regions already bound the working set

    def __init__(self, channels: int, *, regions: int | None = None, region_size: int | None = None,
                 topk: int = 4, heads: int | None = None, qkv_bias: bool = True, lce_kernel: int = 5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = "BiLevelRoutingAttention"
        check_int(regions, "regions", name, optional=True)
        check_int(region_size, "region_size", name, optional=True)
        if regions is not None and region_size is not None:
            raise ValueError(f"{name}: give regions (regions per side) or region_size (tokens per "
                             f"region side), not both; got regions={regions}, region_size={region_size}")
        if regions is None and region_size is None:
            region_size = 8
        check_int(topk, "topk", name)
        check_odd(lce_kernel, "lce_kernel", name)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, name)
        self.regions = regions
        self.region_size = region_size
        self.topk = topk
        self.reference = False
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.lce = nn.Conv2d(channels, channels, lce_kernel, padding=lce_kernel // 2, groups=channels, **dd)
        self.proj = nn.Linear(channels, channels, **dd)

    def grid(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(sh, rh, sw, rw)``: regions down and across, and the region's height and width in tokens,
        for an ``h x w`` map (the padded map is ``sh * rh`` x ``sw * rw``)."""
        if self.regions is not None:  # regions of ceil(h / S) tokens; those of padding only dropped
            rh, rw = -(-h // self.regions), -(-w // self.regions)
            return -(-h // rh), rh, -(-w // rw), rw
        r = self.region_size  # one region down (across) is cut to the map: no rows of padding only
        return -(-h // r), min(r, h), -(-w // r), min(r, w)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        sh, rh, sw, rw = self.grid(h, w)
        hp, wp = sh * rh, sw * rw
        nr, rr = sh * sw, rh * rw  # regions, tokens per region
        k_top = min(self.topk, nr)
        heads, d = self.heads, c // self.heads
        # tokens last (N, H, W, C) throughout: matmul projections and a channels-last depthwise
        # convolution, whose CPU backward is ~8x faster than the NCHW one
        qkv = self.qkv(x.permute(0, 2, 3, 1))  # (N, H, W, 3C)
        q, k, v = qkv.view(n, h, w, 3, c).unbind(3)  # views; the backward is one stack, no zero fill
        v_map = v.contiguous().permute(0, 3, 1, 2)  # (N, C, H, W) in channels-last memory (vmap-safe)
        lce = depthwise_conv(self.lce, v_map).permute(0, 2, 3, 1)  # (N, H, W, C): unpadded map
        kv = torch.cat([k, v], -1)  # (N, H, W, 2C): one row per region after partitioning
        if hp != h or wp != w:  # pad after the projection, so padded tokens are exact zeros
            q, kv = (F.pad(t, (0, 0, 0, wp - w, 0, hp - h)) for t in (q, kv))
        q = _to_regions(q, sh, rh, sw, rw)  # (N, nr, rr, C)
        kv = _to_regions(kv, sh, rh, sw, rw)  # (N, nr, rr, 2C)
        valid = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=x.device)
        valid[:, :h, :w] = True
        valid = _to_regions(valid, sh, rh, sw, rw).view(nr, rr)  # (nr, rr)
        # region level: routing by mean query / mean key affinity (no gradient through indices),
        # in at least float32: bf16 affinities round close regions into ties and flip the choice
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            count = valid.sum(1).to(acc)[:, None]  # (nr, 1) real tokens per region (every region has some)
            q_r = q.sum(2, dtype=acc) / count  # (N, nr, C): padded tokens are zeros
            k_r = kv[..., :c].sum(2, dtype=acc) / count
            logits = (q_r @ k_r.transpose(1, 2)) * c ** -0.5  # (N, nr, nr)
            idx = logits.topk(k_top, -1).indices  # (N, nr, k_top)

        # token level: gather the chosen regions' keys/values through one index_select on rows
        flat = (idx + torch.arange(n, device=x.device).view(n, 1, 1) * nr).view(-1)  # (N*nr*k_top,)
        kv = (kv.reshape(n * nr, rr * 2 * c), flat, (k_top * rr, 2, heads, d))  # gathered lazily
        qh = q.reshape(n * nr, rr, heads, d).transpose(1, 2)  # (N*nr, heads, rr, d)
        mask = None
        if hp != h or wp != w:  # padded keys masked out
            key_ok = valid[idx.view(-1)].view(n * nr, 1, 1, k_top * rr)
            mask = qh.new_zeros(key_ok.shape).masked_fill(~key_ok, float("-inf"))
        y, keys = self._attend_in_chunks(qh, kv, mask)  # (N*nr, heads, rr, d)
        if self._capture is not None:
            self._record(qh, keys, mask, idx, valid, (sh, rh, sw, rw), h, w)
        y = y.transpose(1, 2).reshape(n, nr, rr, c)
        y = _from_regions(y, sh, rh, sw, rw)[:, :h, :w] + lce  # (N, H, W, C)
        return torch.add(x, self.proj(y).permute(0, 3, 1, 2), out=out)

    def _attend_in_chunks(self, qh: torch.Tensor, kv: tuple,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level attention of every region over its gathered regions. The gather runs over
        chunks of regions whose gathered keys/values take about ``GATHER_BYTES``, so they are
        read back from cache, not memory, on large maps (one chunk when compiling or capturing).
        Returns the output ``(N*nr, heads, rr, d)`` and the last chunk's gathered keys (all of
        them when capturing)."""
        rows, flat, (keys, two, heads, d) = kv
        regions, k_top = qh.shape[0], flat.numel() // qh.shape[0]
        per_region = keys * two * heads * d * rows.element_size()
        step = regions
        if not torch.compiler.is_compiling() and self._capture is None:
            step = max(1, GATHER_BYTES // per_region)
        outs, source = [], RowChunks(rows, -(-regions // step))
        for start in range(0, regions, step):
            stop = min(start + step, regions)
            g = source.take(flat[start * k_top:stop * k_top])  # (chunk*k_top, rr*2C)
            g = g.view(stop - start, keys, two, heads, d).permute(2, 0, 3, 1, 4)  # (2, chunk, heads, k*rr, d)
            m = None if mask is None else mask[start:stop]
            outs.append(attend(qh[start:stop], g[0], g[1], mask=m, reference=self.reference))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 0)), g[0]

    def _record(self, qh: torch.Tensor, kg: torch.Tensor, mask: torch.Tensor | None, idx: torch.Tensor,
                valid: torch.Tensor, grid: tuple[int, int, int, int], h: int, w: int) -> None:
        """Store "received" and "query" maps (explain only): the token-level probabilities written
        out, scattered back to the keys' positions on the map."""
        sh, rh, sw, rw = grid
        nr, rr = sh * sw, rh * rw
        n, k_top = idx.shape[0], idx.shape[2]
        scale = 1.0 / math.sqrt(qh.shape[-1])
        s = (qh @ kg.transpose(-2, -1)) * scale
        p = (s if mask is None else s + mask).softmax(-1).float().mean(1)  # (N*nr, rr, k*rr)
        p = p.view(n, nr, rr, k_top * rr)
        # the padded-map token (in region layout) of every gathered key
        cols = (idx[..., None] * rr + torch.arange(rr, device=idx.device)).view(n, nr, k_top * rr)

        def to_map(weights: torch.Tensor) -> torch.Tensor:  # (N, nr, k*rr) -> (N, H, W)
            flat = torch.zeros(n, nr * rr, device=weights.device).scatter_add_(1, cols.flatten(1),
                                                                               weights.flatten(1))
            return _from_regions(flat.view(n, nr, rr, 1), sh, rh, sw, rw)[:, :h, :w, 0]

        q_ok = valid.view(1, nr, rr, 1).float()  # only real queries count
        self._capture.add("received", to_map((p * q_ok).sum(2)) / (h * w))
        qi = self._capture.query_index(h, w)
        if qi is not None:
            yq, xq = divmod(qi, w)
            region, token = (yq // rh) * sw + xq // rw, (yq % rh) * rw + xq % rw
            row = torch.zeros_like(p[:, :, 0])
            row[:, region] = p[:, region, token]
            self._capture.add("query", to_map(row))

    def extra_repr(self) -> str:
        grid = f"regions={self.regions}" if self.regions is not None else f"region_size={self.region_size}"
        return f"channels={self.channels}, {grid}, topk={self.topk}, heads={self.heads}"
