"""External attention: attention against two small learnable memories shared by the whole dataset,
with a double normalisation (softmax over positions, then L1 over memory slots).

Paper: Guo, Liu, Mu, Hu. "Beyond Self-attention: External Attention using Two Linear Layers for
Visual Tasks", TPAMI 2022. https://arxiv.org/abs/2105.02358
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, SafeBatchNorm2d, check_int

__all__ = ["ExternalAttention"]


class ExternalAttention(AttentionBlock):
    """``x + BN(conv(M_v^T norm(M_k conv(x))))`` with memories ``M_k, M_v`` of ``memory`` slots.

    ``norm`` is the paper's double normalisation: softmax over the positions of each slot, then
    each position's slot weights divided by their sum. The authors' segmentation head ends with a
    ReLU after the residual; as a block we leave it out so the output keeps negative values.

    Captured (:mod:`visattn.explain`): positions attend to memory slots, not to each other. The
    analogue of a position-to-position attention is the path through the memory:
    ``A_ij = sum_s slots_s(i) read_s(j)``, position ``i``'s weight on slot ``s`` (after the double
    normalisation) times slot ``s``'s softmax over positions ``j`` (the positions the slot
    responds to; the value a slot returns is a learned memory, not ``x_j``). Each row sums to 1;
    ``"received"`` is its mean over queries, ``"query"`` the query point's row.

    Args:
        channels: input channels C.
        memory: number of memory slots S (paper: 64).
    """

    def __init__(self, channels: int, *, memory: int = 64,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "ExternalAttention")
        check_int(memory, "memory", "ExternalAttention")
        dd = {"device": device, "dtype": dtype}
        self.conv_in = nn.Conv2d(channels, channels, 1, **dd)
        self.mk = nn.Conv1d(channels, memory, 1, bias=False, **dd)
        self.mv = nn.Conv1d(memory, channels, 1, bias=False, **dd)
        with torch.no_grad():  # the authors tie the memories at initialisation
            self.mv.weight.copy_(self.mk.weight.transpose(0, 1))
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False, **dd)
        self.bn = SafeBatchNorm2d(channels, **dd)

    def _record(self, read: torch.Tensor, slots: torch.Tensor, h: int, w: int) -> None:
        """``read`` ``(N, S, HW)``: each slot's softmax over positions; ``slots`` ``(N, S, HW)``:
        each position's weights over the slots (sum 1 over S)."""
        n = read.shape[0]
        received = torch.einsum("ns,nsj->nj", slots.mean(2), read)  # mean_i A_ij
        self._capture.add("received", received.view(n, h, w))
        qi = self._capture.query_index(h, w)
        if qi is not None:
            self._capture.add("query", torch.einsum("ns,nsj->nj", slots[..., qi], read).view(n, h, w))

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        attn = self.mk(self.conv_in(x).flatten(2))  # (N, S, HW)
        attn = attn.softmax(-1)  # over positions
        read = attn
        attn = attn / (1e-9 + attn.sum(1, keepdim=True))  # over memory slots
        if self._capture is not None:
            self._record(read.float(), attn.float(), h, w)
        y = self.mv(attn).view(n, c, h, w)  # (N, C, H, W)
        return torch.add(x, self.bn(self.conv_out(y)), out=out)
