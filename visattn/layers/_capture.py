"""Recording the attention a block applied, for :mod:`visattn.explain`.

Every :class:`~visattn.layers._base.AttentionBlock` has a ``_capture`` attribute that is ``None``
unless someone is explaining the model. Then it holds a :class:`Capture`, and the block, while
computing exactly what it always computes, stores its attention in it with :meth:`Capture.add`,
under one of the standard keys below. When ``_capture`` is ``None`` nothing is stored and nothing
extra is computed (one attribute test per forward).

Standard keys and shapes (``N`` batch, ``C`` channels, ``H, W`` the block's input map, ``S``
context tokens of a cross-attention block); every tensor is detached, float32, on the input's device:

* ``"channel"``  ``(N, C)``   per-channel gate applied to the features;
* ``"spatial"``  ``(N, H, W)`` spatial gate (for a per-channel spatial gate: its mean over channels);
* ``"received"`` ``(N, H, W)`` attention each position receives: the attention probabilities summed
  over queries, averaged over heads, divided by the number of queries (sums to 1 over the map for a
  softmax attention over all positions);
* ``"query"``    ``(N, H, W)`` (``(N, S)`` for cross-attention) the attention the query position
  :attr:`Capture.query` pays over the map (over the context tokens), averaged over heads.
* ``"context"``  ``(N, S)`` attention each of the ``S`` context tokens of a cross-attention block
  receives (summed over queries, averaged over heads, divided by the number of queries).

Blocks whose attention is not one softmax over the whole map (windowed, axial, criss-cross,
linear, external, spatial-reduction) document in their docstring what they record under these
keys; :func:`visattn.layers._attention.record_attention` records the common case.

A block records the keys that exist for it (a hybrid gate both ``"channel"`` and ``"spatial"``).
Recording a key twice in one forward pass (a block applying two gates of one kind) multiplies
the gates for ``"channel"``/``"spatial"`` and averages the distributions for ``"received"``/``"query"``.
A block called again on a map of another size in the same pass (one module shared by several
pyramid levels) keeps its first recording; :attr:`Capture.dropped` counts the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["KEYS", "Capture"]

#: The standard keys a block may record.
KEYS = ("channel", "spatial", "received", "query", "context")


@dataclass
class Capture:
    """What one block recorded during one forward pass.

    Attributes:
        query: the query point as ``(y, x)`` fractions of the map's height and width, each in
            ``[0, 1]`` (``(0.5, 0.5)`` is the centre), or ``None`` for no query map. A block maps it
            to the position ``(min(int(y * H), H - 1), min(int(x * W), W - 1))`` of its own map.
        maps: the recorded tensors by key.
    """

    query: tuple[float, float] | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict, repr=False)
    #: Recordings not kept, by key (a shape other than the first recording's).
    dropped: dict[str, int] = field(default_factory=dict)

    def query_index(self, h: int, w: int) -> int | None:
        """The flat index ``y * w + x`` of :attr:`query` on an ``h x w`` map (``None`` without one)."""
        if self.query is None:
            return None
        qy, qx = self.query
        return min(int(qy * h), h - 1) * w + min(int(qx * w), w - 1)

    def add(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` (detached, as float32) under the standard ``key``."""
        if key not in KEYS:
            raise ValueError(f"unknown capture key {key!r}; valid: {', '.join(KEYS)}")
        value = value.detach().float()
        old = self.maps.get(key)
        if old is None:
            self.maps[key], self._counts[key] = value, 1
        elif old.shape != value.shape:  # the block ran again on another map: keep the first
            self.dropped[key] = self.dropped.get(key, 0) + 1
        elif key in ("channel", "spatial"):
            self.maps[key] = old * value
        else:  # running mean of distributions
            n = self._counts[key]
            self.maps[key] = (old * n + value) / (n + 1)
            self._counts[key] = n + 1
