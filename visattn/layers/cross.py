"""Cross-attention: queries from a feature map, keys and values from a context (another feature
map, another pyramid level, or a token sequence from another modality).

Paper: Vaswani et al. "Attention Is All You Need", NeurIPS 2017 (encoder-decoder attention).
https://arxiv.org/abs/1706.03762
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._attention import (
    attend,
    attention_totals,
    check_heads,
    merge_heads,
    record_attention,
    split_heads,
)
from ._base import AttentionBlock, _call_block, _param_dtype, check_input, check_int, dtype_mismatch

fx.wrap("_call_block")  # torch.fx records calls from this module too as one node (see _base)

__all__ = ["CrossAttention"]


class CrossAttention(AttentionBlock):
    """``x + proj(MHA(q = W_q x, k, v = W_{k,v} context))``.

    ``forward(x, context=None)``: ``x`` is ``(N, C, H, W)``; ``context`` is a feature map
    ``(N, C_ctx, H', W')`` of any size or a token sequence ``(N, L, C_ctx)``, with ``C_ctx`` the
    ``context_channels`` the block was built for. Without a context the block attends to ``x``
    itself (so it satisfies the plain block contract too).

    Args:
        channels: input channels C.
        context_channels: channels of the context (default C).
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/kv projections.

    Captured (:mod:`visattn.explain`): ``"context"`` ``(N, S)``, the attention each context token
    receives, and ``"query"`` ``(N, S)``, the query point's attention over the context tokens.
    Without a context (self-attention) ``"received"`` / ``"query"`` are maps of ``x`` as for
    :class:`~visattn.layers.MultiHeadSelfAttention`; with a context *map* ``"received"`` is what
    its positions receive, resampled onto ``x``'s grid (meaningful when the context covers the
    same image, e.g. another pyramid level); a token context has no map.

    Example:
        >>> block = CrossAttention(256, context_channels=512)
        >>> text = torch.randn(2, 12, 512)               # 12 tokens
        >>> block(torch.randn(2, 256, 32, 32), text).shape
        torch.Size([2, 256, 32, 32])
    """

    chunked_inference = False  # the context would need slicing too

    def __init__(self, channels: int, *, context_channels: int | None = None, heads: int | None = None,
                 qkv_bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = check_heads(channels, heads, "CrossAttention")
        self.channels = channels
        check_int(context_channels, "context_channels", "CrossAttention", optional=True)
        self.context_channels = context_channels or channels
        self.reference = False
        self.q = nn.Linear(channels, channels, bias=qkv_bias, **dd)
        self.kv = nn.Linear(self.context_channels, 2 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)

    def _context_tokens(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not isinstance(context, torch.Tensor) or context.ndim not in (3, 4):
            got = f"a {context.ndim}-D tensor of shape {tuple(context.shape)}" \
                if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError("CrossAttention context must be a feature map (N, C_ctx, H, W) or a token "
                             f"sequence (N, L, C_ctx), got {got}")
        if not context.is_floating_point():
            raise TypeError(f"CrossAttention context must be a floating-point tensor, got {context.dtype}")
        if why := dtype_mismatch(context.dtype, x.dtype, x.device.type, "give both the block's dtype"):
            raise TypeError(f"CrossAttention context has dtype {context.dtype} but x has {x.dtype}; {why}")
        tokens = context.flatten(2).transpose(1, 2) if context.ndim == 4 else context  # (N, L, C_ctx)
        if tokens.shape[-1] != self.context_channels:
            raise ValueError(f"CrossAttention was built for context_channels={self.context_channels}, "
                             f"got a context of shape {tuple(context.shape)}")
        if tokens.shape[0] != x.shape[0] or tokens.shape[1] == 0:
            raise ValueError(f"CrossAttention context of shape {tuple(context.shape)} does not match "
                             f"the batch of x {tuple(x.shape)} or is empty")
        return tokens

    def _record(self, q: torch.Tensor, k: torch.Tensor, size: tuple[int, int],
                context: torch.Tensor | None) -> None:
        if context is None:  # self-attention over x
            record_attention(self._capture, q, k, size=size)
            return
        n = q.shape[0]
        received, row = attention_totals(q, k, query=self._capture.query_index(*size))  # (N, S) each
        self._capture.add("context", received)
        if row is not None:
            self._capture.add("query", row)
        if context.ndim == 4:  # a map: what its positions receive, resampled onto x's grid
            rmap = F.interpolate(received.view(n, 1, *context.shape[-2:]), size=size, mode="bilinear",
                                 align_corners=False)[:, 0]
            self._capture.add("received", rmap / rmap.sum((1, 2), keepdim=True).clamp_min(1e-12))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._refuse_root_trace(x)
        return _call_block(self, x, context)

    def _checked_forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.channels, "CrossAttention", _param_dtype(self))
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        ctx = tokens if context is None else self._context_tokens(x, context)
        if context is None and self.context_channels != c:
            raise ValueError(f"CrossAttention with context_channels={self.context_channels} != "
                             f"channels={c} needs a context")
        q = split_heads(self.q(tokens), self.heads)
        k, v = (split_heads(z, self.heads) for z in self.kv(ctx).chunk(2, -1))
        if self._capture is not None:
            self._record(q, k, (h, w), context)
        y = self.proj(merge_heads(attend(q, k, v, reference=self.reference)))  # (N, HW, C)
        y = x + y.transpose(1, 2).reshape(n, c, h, w)
        return y if y.dtype == x.dtype else y.to(x.dtype)
