"""KV caches allocated once at their final size and written in place.

``KVCache`` is time-major per layer, (max_len, batch, kv_heads, head_dim), matching the portable
decoder graph: the prefix ``[:length]`` that the decoder reads and the slot ``[length:length+n]``
that it writes are both contiguous views, so neither is copied (the ONNX Runtime backend binds
them directly). ``SharedKVCache`` is the ``decoder_gqa`` graph's: one (batch, kv_heads, max_len,
head_dim) buffer per layer and K/V, bound as both the past input and the present output.
"""

from __future__ import annotations

import numpy as np


class _Preallocated:
    """One buffer for every layer's K and V, allocated once; ``length`` positions are filled."""

    def __init__(
        self, num_layers: int, max_len: int, layer_shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        self.buffer = np.zeros((num_layers, 2, *layer_shape), dtype=dtype)
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} > {self.max_len}")

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class KVCache(_Preallocated):
    """Time-major, (max_len, batch, kv_heads, head_dim) per layer: the portable decoder's."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(num_layers, max_len, (max_len, batch, kv_heads, head_dim), dtype)

    def past(self) -> dict[str, np.ndarray]:
        """``past.{i}.key/value`` views of the filled prefix."""
        return self._views(0, self.length, "past")

    def slots(self, n: int) -> dict[str, np.ndarray]:
        """``present.{i}.key/value`` views where the next ``n`` positions will be written."""
        self.check_room(n)
        return self._views(self.length, self.length + n, "present")

    def _views(self, start: int, end: int, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for i in range(self.num_layers):
            out[f"{prefix}.{i}.key"] = self.buffer[i, 0, start:end]
            out[f"{prefix}.{i}.value"] = self.buffer[i, 1, start:end]
        return out


class SharedKVCache(_Preallocated):
    """Head-major, (batch, kv_heads, max_len, head_dim) per layer, which the graph reads and
    writes itself (``decoder_gqa``)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(num_layers, max_len, (batch, kv_heads, max_len, head_dim), dtype)

    def buffers(self, prefix: str) -> dict[str, np.ndarray]:
        """``{prefix}.{i}.key/value``: the whole per-layer buffers (views, never copies)."""
        out = {}
        for i in range(self.num_layers):
            out[f"{prefix}.{i}.key"] = self.buffer[i, 0]
            out[f"{prefix}.{i}.value"] = self.buffer[i, 1]
        return out
