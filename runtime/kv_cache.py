"""KV caches allocated once at their final size and written in place.

``KVCache`` is time-major per layer, (max_len, batch, kv_heads, head_dim), matching the portable
decoder graph: the prefix ``[:length]`` that the decoder reads and the slot ``[length:length+n]``
that it writes are both contiguous views, so neither is copied (the ONNX Runtime backend binds
them directly). ``SharedKVCache`` is the ``decoder_gqa`` graph's: one (batch, kv_heads, max_len,
head_dim) buffer per layer and K/V, bound as both the past input and the present output.

Either lives in host memory (numpy) or, when the decoder runs on ONNX Runtime's CUDA provider, in
device memory (``DeviceArray``: one ONNX Runtime ``OrtValue``, as onnxruntime-genai keeps its
cache): then no step copies the cache between host and GPU, and GroupQueryAttention keeps its
in-place buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DeviceArray:
    """A contiguous block of device memory seen as an array: its address, shape and dtype (what
    an IO binding takes), and the ``OrtValue`` that owns it (a view holds its parent's)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: str
    owner: object = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key) -> DeviceArray:
        """Leading integers, then at most one step-1 slice: the contiguous views caches take."""
        key = key if isinstance(key, tuple) else (key,)
        strides = [
            int(np.prod(self.shape[i + 1 :])) * self.dtype.itemsize for i in range(len(self.shape))
        ]
        offset, dims = 0, list(self.shape)
        if len(key) > len(self.shape):
            raise IndexError(f"{len(key)} indices for a {len(self.shape)}-d device array")
        for axis, index in enumerate(key):
            if isinstance(index, slice):
                start, stop, step = index.indices(self.shape[axis])
                stop = max(stop, start)
                if step != 1 or axis != len(key) - 1:
                    raise IndexError("a device view takes integers, then one step-1 slice")
                offset += start * strides[axis]
                return DeviceArray(
                    self.ptr + offset,
                    (stop - start, *self.shape[axis + 1 :]),
                    self.dtype,
                    self.device,
                    self.owner,
                )
            if not -self.shape[axis] <= int(index) < self.shape[axis]:
                raise IndexError(f"index {index} out of range for axis {axis} ({self.shape[axis]})")
            offset += (int(index) % self.shape[axis]) * strides[axis]
            dims = list(self.shape[axis + 1 :])
        return DeviceArray(self.ptr + offset, tuple(dims), self.dtype, self.device, self.owner)


def allocate(shape: tuple[int, ...], dtype: np.dtype, device: str = "cpu"):
    """A cache buffer: zeros in a numpy array on the host, a ``DeviceArray`` over an ONNX Runtime
    ``OrtValue`` on ``cuda``."""
    if device == "cpu":
        return np.zeros(shape, dtype=dtype)
    import onnxruntime as ort

    # uninitialised (a zeroed host copy first would hold the cache twice on a Jetson's shared
    # memory): the decoders read only positions they wrote
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), device, 0)
    return DeviceArray(int(value.data_ptr()), tuple(shape), np.dtype(dtype), device, value)


class _Preallocated:
    """One buffer for every layer's K and V, allocated once; ``length`` positions are filled."""

    def __init__(
        self,
        num_layers: int,
        max_len: int,
        layer_shape: tuple[int, ...],
        dtype: np.dtype,
        device: str = "cpu",
    ) -> None:
        self.buffer = allocate((num_layers, 2, *layer_shape), np.dtype(dtype), device)
        self.device = device
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} > {self.max_len}")

    def require_host(self, why: str) -> None:
        if self.device != "cpu":
            raise ValueError(f"a KV cache on {self.device} cannot be used with {why}")

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
        device: str = "cpu",
    ) -> None:
        super().__init__(num_layers, max_len, (max_len, batch, kv_heads, head_dim), dtype, device)

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
        device: str = "cpu",
    ) -> None:
        super().__init__(num_layers, max_len, (batch, kv_heads, max_len, head_dim), dtype, device)
        self.binding = None  # an ONNX Runtime IO binding of the whole buffers, kept by ``run``
        self.bound_to = None  # the runner it belongs to

    def buffers(self, prefix: str, row: int | None = None) -> dict[str, np.ndarray]:
        """``{prefix}.{i}.key/value``: the per-layer buffers, whole or one ``row``'s slice
        (views, never copies)."""
        rows = slice(None) if row is None else slice(row, row + 1)
        out = {}
        for i in range(self.num_layers):
            out[f"{prefix}.{i}.key"] = self.buffer[i, 0, rows]
            out[f"{prefix}.{i}.value"] = self.buffer[i, 1, rows]
        return out

    def run(self, runner, feeds: dict, logits: np.ndarray, release: bool, row=None) -> None:
        """Run ``decoder_gqa`` on these buffers, which it reads and writes in place (``row``: one
        row's slice, a prefill into a batch row); ``logits`` is filled. On ONNX Runtime the whole
        buffers are bound to the session once (``bind_fixed``) and a step binds only its small
        inputs (binding 48 buffers every step cost ~0.2 ms of a 10 ms w4 step on ``small``)."""
        if row is None and hasattr(runner, "bind_fixed"):
            if self.bound_to is not runner:
                self.binding = runner.bind_fixed(self.buffers("past"), self.buffers("present"))
                self.bound_to = runner
            runner.infer_into(feeds, {"logits": logits}, release=release, binding=self.binding)
        elif hasattr(runner, "infer_into"):
            outputs = {"logits": logits, **self.buffers("present", row)}
            runner.infer_into(feeds | self.buffers("past", row), outputs, release=release)
        else:
            self.require_host("a runner without IO binding")
            out = runner.infer(feeds | self.buffers("past", row))
            for name, buffer in self.buffers("present", row).items():
                buffer[...] = out[name]
            logits[...] = out["logits"]
