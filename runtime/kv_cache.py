"""A KV cache allocated once at its final size and written in place.

Layout is time-major per layer, (max_len, batch, kv_heads, head_dim), matching the decoder graph:
the prefix ``[:length]`` that the decoder reads and the slot ``[length:length+n]`` that it writes
are both contiguous views, so neither is copied (the ONNX Runtime backend binds them directly).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: np.dtype = np.float32) -> None:  # fmt: skip
        self.buffer = np.zeros((num_layers, 2, max_len, batch, kv_heads, head_dim), dtype=dtype)
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def past(self) -> dict[str, np.ndarray]:
        """``past.{i}.key/value`` views of the filled prefix."""
        return self._views(0, self.length, "past")

    def slots(self, n: int) -> dict[str, np.ndarray]:
        """``present.{i}.key/value`` views where the next ``n`` positions will be written."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} > {self.max_len}")
        return self._views(self.length, self.length + n, "present")

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def _views(self, start: int, end: int, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for i in range(self.num_layers):
            out[f"{prefix}.{i}.key"] = self.buffer[i, 0, start:end]
            out[f"{prefix}.{i}.value"] = self.buffer[i, 1, start:end]
        return out
