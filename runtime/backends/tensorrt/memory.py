"""Device memory, copies and the stream through cuda-python's runtime API. One ``CudaMemory``
per runner: its stream is created with it and destroyed by ``close()``. Tests run it on the
cuda-python stand-in (``tests/standins``), whose device memory is host memory."""

from __future__ import annotations

import numpy as np

from runtime.backends.tensorrt.device import import_cudart
from runtime.errors import FilaError

CUDA_HINTS = {
    "cudaErrorInsufficientDriver": "no NVIDIA driver, or one older than this cuda-python's CUDA "
    "(on JetPack 6.1/6.2: pip install 'cuda-python>=12.6,<12.7'); run fila doctor",
    "cudaErrorNoDevice": "no CUDA GPU is visible to this process; run fila doctor",
    "cudaErrorMemoryAllocation": "out of GPU memory: fila plan shows what fits (precision, "
    "context, tiles)",
}


class CudaError(FilaError):
    """A CUDA runtime call failed."""


class CudaMemory:
    def __init__(self) -> None:
        self.cudart = import_cudart()
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)  # what TensorRT's calls take

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            hint = CUDA_HINTS.get(name, "run fila doctor to check the CUDA stack")
            raise CudaError(f"CUDA error {name} ({int(err)}): {hint}")
        return rest[0] if rest else None

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.cudart.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._check(self.cudart.cudaFree(ptr))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream)
        )

    def download(self, array: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream)
        )

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device to device, on the stream (ordered after the work enqueued before it)."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        """Destroy the stream (after the work on it is done)."""
        if self.stream is not None:
            stream, self.stream, self.stream_handle = self.stream, None, 0
            try:
                self._check(self.cudart.cudaStreamSynchronize(stream))
            finally:
                self._check(self.cudart.cudaStreamDestroy(stream))
