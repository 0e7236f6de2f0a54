"""What GPU and board this is: engines are only valid where they were built."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import FilaError


def gpu_info() -> dict:
    """Name and compute capability of GPU 0 via cuda-python (the ``trt`` extra)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise FilaError(
                "cuda-python is not installed: pip install 'fila-deploy[trt]' (it reads the GPU "
                "that engines are built for and run on)"
            ) from exc
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise FilaError(f"no CUDA GPU found (cudaGetDeviceProperties(0) returned {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def jetson_release() -> str | None:
    """L4T release from /etc/nv_tegra_release (JetPack 6 is L4T R36), or None off Jetson."""
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    return path.read_text().splitlines()[0].strip()
