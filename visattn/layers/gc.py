"""Global Context block: a query-independent attention pooling (one softmax map over positions)
feeds a bottleneck transform that is fused back into every position.

Paper: Cao, Xu, Lin, Wei, Hu. "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
Beyond", ICCV Workshops 2019. https://arxiv.org/abs/1904.11492
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionBlock, check_float, check_int, get_act_layer, make_divisible

__all__ = ["GlobalContext"]


class _LayerNormC(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, 1, 1)`` context (the paper's LN([C/r, 1, 1]))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.flatten(1), self.normalized_shape, self.weight, self.bias,
                            self.eps).view_as(x)


class _ContextMlp(nn.Module):
    def __init__(self, channels: int, rd_channels: int, act_layer, dd) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.norm = _LayerNormC(rd_channels, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class GlobalContext(AttentionBlock):
    """Context ``c = sum_j softmax_j(W_k x_j) x_j`` -> transform ``t = W2 ReLU(LN(W1 c))`` -> fuse.

    Args:
        channels: input channels C.
        fusion: ``"add"`` (``x + t``, the paper's best), ``"scale"`` (``x * sigmoid(t)``, SE-like) or
            ``"both"``.
        use_attn: attention pooling (paper); ``False`` uses plain average pooling.
        rd_ratio / rd_channels / rd_divisor: bottleneck width (paper: C/16; timm: C/8).
        act_layer: bottleneck activation.

    The "add" transform's last conv starts at zero weight (the paper's initialisation), so the block
    starts close to identity. Parameter layout matches ``timm.layers.GlobalContext`` (``conv_attn``,
    ``mlp_add``, ``mlp_scale``).

    Captured (:mod:`visattn.explain`): ``"spatial"`` is the context-pooling softmax over positions
    (with ``use_attn``; a distribution summing to 1, not a gate near 1), ``"channel"`` the
    ``sigmoid`` scale gate (with ``fusion`` "scale" or "both").
    """

    def __init__(
        self,
        channels: int,
        *,
        fusion: str = "add",
        use_attn: bool = True,
        rd_ratio: float = 1.0 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: str | type[nn.Module] = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if fusion not in ("add", "scale", "both"):
            raise ValueError(f"GlobalContext fusion must be 'add', 'scale' or 'both', got {fusion!r}")
        self.channels = check_int(channels, "channels", "GlobalContext")
        check_float(rd_ratio, "rd_ratio", "GlobalContext")
        check_int(rd_channels, "rd_channels", "GlobalContext", optional=True)
        check_int(rd_divisor, "rd_divisor", "GlobalContext")
        dd = {"device": device, "dtype": dtype}
        self.fusion = fusion
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.conv_attn = nn.Conv2d(channels, 1, 1, **dd) if use_attn else None
        self.mlp_scale = _ContextMlp(channels, rd_channels, act_layer, dd) if fusion != "add" else None
        self.mlp_add = _ContextMlp(channels, rd_channels, act_layer, dd) if fusion != "scale" else None
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.mlp_add is not None:
            nn.init.zeros_(self.mlp_add.fc2.weight)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.conv_attn is not None:
            attn = self.conv_attn(x).view(n, h * w, 1).softmax(1)  # (N, HW, 1)
            if self._capture is not None:
                self._capture.add("spatial", attn.view(n, h, w))
            context = torch.bmm(x.reshape(n, c, h * w), attn).view(n, c, 1, 1)
        else:
            context = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        if self.mlp_scale is None:
            return torch.add(x, self.mlp_add(context), out=out)
        scale = torch.sigmoid(self.mlp_scale(context))
        if self._capture is not None:
            self._capture.add("channel", scale.flatten(1))
        if self.mlp_add is None:
            return torch.mul(x, scale, out=out)
        return torch.addcmul(self.mlp_add(context), x, scale, out=out)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, fusion={self.fusion!r}"
