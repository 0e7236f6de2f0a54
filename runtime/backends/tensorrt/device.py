"""What GPU and board this is: engines are only valid where they were built."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import FilaError


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise FilaError(
                "cuda-python is not installed: pip install 'fila-deploy[trt]' (on a Jetson the "
                "jetpack6 / jetpack7 extra; it allocates the engines' buffers and reads the GPU "
                "they are built for)"
            ) from exc
    return cudart


def gpu_info() -> dict:
    """Name and compute capability of GPU 0 via cuda-python (the ``trt`` extra)."""
    err, props = import_cudart().cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise FilaError(f"no CUDA GPU found (cudaGetDeviceProperties(0) returned {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {
        "name": name.rstrip("\x00"),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": int(props.multiProcessorCount),
        "memory_gb": round(int(props.totalGlobalMem) / 2**30),
    }


IDENTITY = ("compute_capability", "sm_count", "memory_gb")


def same_gpu(built: dict, here: dict) -> bool:
    """Whether a plan built on ``built`` runs here: compute capability, SM count and memory
    (an AGX Orin and an Orin Nano both call themselves "Orin"); by name for older records."""
    if all(k in built and k in here for k in IDENTITY):
        return all(built[k] == here[k] for k in IDENTITY)
    return built.get("name") == here.get("name")


def describe(gpu: dict) -> str:
    parts = [gpu.get("name", "?")]
    if "compute_capability" in gpu:
        parts.append(f"sm_{gpu['compute_capability'].replace('.', '')}")
    if "sm_count" in gpu:
        parts.append(f"{gpu['sm_count']} SMs")
    if "memory_gb" in gpu:
        parts.append(f"{gpu['memory_gb']} GB")
    return " ".join(parts)


def jetson_release() -> str | None:
    """L4T release from /etc/nv_tegra_release (JetPack 6 is L4T R36), or None off Jetson."""
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    return path.read_text().splitlines()[0].strip()
