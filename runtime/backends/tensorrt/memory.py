"""Device memory and copies through cuda-python's runtime API. Tests replace it with a host fake,
so the runner's buffer, profile and cache logic is exercised without a GPU."""

from __future__ import annotations

import numpy as np

from runtime.errors import FilaError

CUDA_HINTS = {
    "cudaErrorInsufficientDriver": "no NVIDIA driver, or one older than this cuda-python's CUDA "
    "(on JetPack 6: pip install 'cuda-python>=12.6,<13'); run fila doctor",
    "cudaErrorNoDevice": "no CUDA GPU is visible to this process; run fila doctor",
    "cudaErrorMemoryAllocation": "out of GPU memory: fila plan shows what fits (precision, "
    "context, tiles)",
}


class CudaMemory:
    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.cudart = cudart
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            hint = CUDA_HINTS.get(name, "run fila doctor to check the CUDA stack")
            raise FilaError(f"CUDA error {name} ({int(err)}): {hint}")
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

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))
