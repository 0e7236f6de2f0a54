"""Requests of different lengths decoded together: continuous batching on ``decoder_gqa``.

One shared KV buffer per layer, (rows, kv_heads, max_len, head_dim), as the graph reads and
writes it in place. Each row has its own length: a decode step gives every row its own
``seqlens_k`` and position, so a request joins after its prefill (run on its row's slice of the
buffers, batch 1: no copy) and leaves at its stop, while the others keep going. A free row is
stepped too (at position 0 of its own slice, its logits ignored): the step's cost is the weights
it reads, which every row shares.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.base import np_dtype
from runtime.errors import FilaError
from runtime.generate import DecoderShape
from runtime.kv_cache import SharedKVCache


class BatchDecoder:
    """``rows`` slots on one ``decoder_gqa`` runner, each with its own length."""

    def __init__(self, runner, shape: DecoderShape, rows: int, max_len: int) -> None:
        inputs = {meta.name: meta for meta in getattr(runner, "inputs", ())}
        if "seqlens_k" not in inputs:
            raise FilaError("batched decoding needs the decoder_gqa graph (ONNX Runtime)")
        self.runner, self.rows, self.max_len = runner, rows, max_len
        dtype = np_dtype(inputs["past.0.key"].dtype)  # an fp16 graph keeps an fp16 cache
        device = getattr(runner, "cache_device", "cpu")  # the GPU under ONNX Runtime's CUDA
        self.cache = SharedKVCache(
            shape.num_layers, rows, shape.kv_heads, shape.head_dim, max_len, dtype, device
        )
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.logits = np.zeros((rows, shape.vocab), dtype=np.float32)
        self.row_logits = np.zeros((1, shape.vocab), dtype=np.float32)

    def _run(self, feeds: dict, row: int | None, logits: np.ndarray) -> np.ndarray:
        self.cache.run(self.runner, feeds, logits, release=row is not None, row=row)
        return logits

    def prefill(self, row: int, embeds: np.ndarray) -> np.ndarray:
        """Run a prompt, (1, n, D), into an empty row; returns its next-token logits (V,)."""
        n = embeds.shape[1]
        self._check_room(row, n)
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "seqlens_k": np.array([n - 1], dtype=np.int32),
            "total_sequence_length": np.array(n, dtype=np.int32),
        }
        self._run(feeds, row, self.row_logits)
        self.lengths[row] = n
        return self.row_logits[0]

    def step(self, embeds: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One token for every row, (rows, 1, D); ``active`` rows advance. Returns (rows, V)."""
        for row in np.flatnonzero(active):
            self._check_room(int(row), 1)
        positions = np.where(active, self.lengths, 0)
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "position_ids": positions[:, None].astype(np.int64),
            "seqlens_k": positions.astype(np.int32),
            "total_sequence_length": np.array(positions.max() + 1, dtype=np.int32),
        }
        self._run(feeds, None, self.logits)
        self.lengths[active] += 1
        return self.logits

    def free(self, row: int) -> None:
        self.lengths[row] = 0

    def _check_room(self, row: int, n: int) -> None:
        if self.lengths[row] + n > self.max_len:
            raise FilaError(
                f"batch row {row}: {self.lengths[row]} + {n} positions exceed the cache "
                f"({self.max_len})"
            )
