"""A STAND-IN for cuda-python's runtime module (``cuda.bindings.runtime``), for tests on machines
without a GPU. It is not CUDA: "device memory" is host memory, copies are ``memmove``.

What it does enforce, as CUDA documents and the TensorRT runner relies on:
- ``cudaMalloc`` returns 256-byte aligned addresses, and the stand-in counts every live
  allocation (``live_bytes()``), so a test can show that ``close()`` freed everything;
- a copy touches device memory only inside one live allocation (an overrun or a freed pointer is
  ``cudaErrorInvalidValue``, where real CUDA would corrupt memory or fault);
- streams exist from ``cudaStreamCreate`` to ``cudaStreamDestroy``; a destroyed or unknown stream
  is ``cudaErrorInvalidResourceHandle``.
What it does not prove: anything about a GPU, a driver, timing, or asynchrony (every call
completes before it returns).

The calls mirror cuda-python's: each returns a tuple whose first item is a ``cudaError_t``.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
from dataclasses import dataclass

import numpy as np

ALIGNMENT = 256  # cudaMalloc's guarantee (CUDA programming guide: at least 256 bytes)
STANDIN = True


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStream_t:  # noqa: N801
    """A stream handle (``int()`` gives the address, as cuda-python's does)."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:  # noqa: N802
        return self._handle


@dataclass
class cudaDeviceProp:  # noqa: N801
    """What ``cudaGetDeviceProperties`` reports: an Orin Nano's shape, named as a stand-in."""

    name: bytes = b"fila stand-in GPU (host memory, not a GPU)"
    major: int = 8
    minor: int = 7
    multiProcessorCount: int = 8  # noqa: N815
    totalGlobalMem: int = 8 * 2**30  # noqa: N815


class _State:
    def __init__(self) -> None:
        self.blocks: dict[int, tuple[np.ndarray, int]] = {}  # ptr -> (backing array, size)
        self.starts: list[int] = []  # sorted ptrs, for lookups by address
        self.streams: set[int] = set()
        self.next_stream = 0x5000
        self.limit: int | None = None  # bytes, to make an allocation fail on purpose
        self.fail_after: int | None = None  # allocations, likewise
        self.mallocs = 0
        self.device = cudaDeviceProp()


_state = _State()


def reset() -> None:
    """Forget every allocation and stream (tests start from zero)."""
    global _state
    _state = _State()


def live_bytes() -> int:
    return sum(size for _, size in _state.blocks.values())


def live_allocations() -> int:
    return len(_state.blocks)


def live_streams() -> int:
    return len(_state.streams)


def set_memory_limit(limit: int | None) -> None:
    """Make ``cudaMalloc`` fail once the live bytes would pass ``limit`` (an out-of-memory)."""
    _state.limit = limit


def fail_after(allocations: int | None) -> None:
    """Make every ``cudaMalloc`` after the next ``allocations`` ones fail (None: none fail)."""
    _state.fail_after = allocations
    _state.mallocs = 0


def device_view(ptr: int, nbytes: int) -> np.ndarray:
    """The bytes ``[ptr, ptr + nbytes)`` of one live allocation, as a writable uint8 array;
    ``ValueError`` when the range is not inside one (what real CUDA would corrupt or fault on)."""
    found = _find(ptr)
    if found is None:
        raise ValueError(f"address {ptr:#x} is not in any live device allocation")
    start, (array, size) = found
    if ptr + nbytes > start + size:
        raise ValueError(
            f"{nbytes} bytes at {ptr:#x} run past the end of its allocation "
            f"({size} bytes at {start:#x}) by {ptr + nbytes - start - size}"
        )
    offset = ptr - array.ctypes.data
    return array[offset : offset + nbytes]


def _find(ptr: int):
    i = bisect.bisect_right(_state.starts, ptr) - 1
    if i < 0:
        return None
    start = _state.starts[i]
    array, size = _state.blocks[start]
    if not start <= ptr < start + max(size, 1):
        return None
    return start, (array, size)


# --- the cuda-python calls -------------------------------------------------------------------
def cudaMalloc(size: int):  # noqa: N802
    size = int(size)
    if size < 0:
        return (cudaError_t.cudaErrorInvalidValue, 0)
    if _state.limit is not None and live_bytes() + size > _state.limit:
        return (cudaError_t.cudaErrorMemoryAllocation, 0)
    _state.mallocs += 1
    if _state.fail_after is not None and _state.mallocs > _state.fail_after:
        return (cudaError_t.cudaErrorMemoryAllocation, 0)
    backing = np.zeros(size + ALIGNMENT, dtype=np.uint8)
    base = backing.ctypes.data
    ptr = base + (-base) % ALIGNMENT
    _state.blocks[ptr] = (backing, size)
    bisect.insort(_state.starts, ptr)
    return (cudaError_t.cudaSuccess, ptr)


def cudaFree(ptr: int):  # noqa: N802
    ptr = int(ptr)
    if ptr not in _state.blocks:
        return (cudaError_t.cudaErrorInvalidDevicePointer,)
    del _state.blocks[ptr]
    _state.starts.remove(ptr)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind, stream):  # noqa: N802
    if int(stream) != 0 and int(stream) not in _state.streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    return _copy(int(dst), int(src), int(count), cudaMemcpyKind(int(kind)))


def cudaMemcpy(dst: int, src: int, count: int, kind):  # noqa: N802
    return _copy(int(dst), int(src), int(count), cudaMemcpyKind(int(kind)))


def _copy(dst: int, src: int, count: int, kind: cudaMemcpyKind):
    try:
        if kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            device_view(dst, count)
        if kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            device_view(src, count)
    except ValueError:
        return (cudaError_t.cudaErrorInvalidValue,)
    if count:
        ctypes.memmove(dst, src, count)
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate():  # noqa: N802
    _state.next_stream += 0x10
    _state.streams.add(_state.next_stream)
    return (cudaError_t.cudaSuccess, cudaStream_t(_state.next_stream))


def cudaStreamDestroy(stream):  # noqa: N802
    handle = int(stream)
    if handle not in _state.streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    _state.streams.remove(handle)
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream):  # noqa: N802
    if int(stream) != 0 and int(stream) not in _state.streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    return (cudaError_t.cudaSuccess,)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    if int(device) != 0:
        return (cudaError_t.cudaErrorInvalidValue, None)
    return (cudaError_t.cudaSuccess, _state.device)


def cudaMemGetInfo():  # noqa: N802
    total = _state.device.totalGlobalMem
    return (cudaError_t.cudaSuccess, total - live_bytes(), total)


def is_live_stream(handle: int) -> bool:
    return int(handle) in _state.streams
