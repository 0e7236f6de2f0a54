"""ONNX files and ONNX Runtime sessions: the one save rule and the one session factory.

Export, calibration, validation, the runtime and the benchmark all write graphs with ``save`` and
open them with ``session``, so a graph's external-data layout and a session's options are decided
in one place. ``onnx`` is imported only by the functions that read or write graphs (the runtime on
a board needs ``session`` alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from runtime.errors import FilaError

# Protobuf cannot hold a message over 2 GiB; onnx.checker and shape inference re-serialize the
# graph, so weights go to external data well before that.
EXTERNAL_DATA_ABOVE = 1_800_000_000
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class BackendError(FilaError):
    """A backend cannot be created with the requested options."""


def data_path(path: Path) -> Path:
    """Where a graph's external data lives: ``<name>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def save(model, path: Path) -> list[Path]:
    """Write ``model``: one file, or the graph plus ``<name>.data`` when its weights are large.
    Returns the files written (the graph first)."""
    import onnx

    path = Path(path)
    data = data_path(path)
    data.unlink(missing_ok=True)
    if _uses_external_data(model) or model.ByteSize() > EXTERNAL_DATA_ABOVE:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        return [path, data]
    onnx.save(model, str(path))
    return [path]


def _uses_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def load(path: Path, external_data: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=external_data)


def check(path: Path) -> None:
    """onnx.checker on the file (path form, so external data is allowed) + shape inference."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    inferred = Path(str(path) + ".inferred")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    inferred.unlink()


def file_bytes(path: Path) -> int:
    """Bytes of a graph on disk, its external data included."""
    path, data = Path(path), data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def initializer_bytes(path: Path) -> int:
    """Bytes of a graph's weights (what a decode step must read), external data included."""
    import onnx

    total = 0
    for init in load(path, external_data=False).graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


# --- sessions -----------------------------------------------------------------------------------
def choose_providers(requested: Sequence[str] | None) -> list[str]:
    """The requested execution providers (each must be installed; short names like ``cuda``
    allowed), CPU last as the fallback; CPU alone when none are asked for."""
    import onnxruntime as ort

    if not requested:
        return ["CPUExecutionProvider"]
    available = list(ort.get_available_providers())
    names = [_provider_name(p) for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(
            f"execution provider(s) {', '.join(missing)} are not in this onnxruntime build "
            f"(it has {', '.join(available)}); install onnxruntime-gpu or drop --providers"
        )
    return names if "CPUExecutionProvider" in names else [*names, "CPUExecutionProvider"]


def _provider_name(name: str) -> str:
    if name.endswith("ExecutionProvider"):
        return name
    short = {"cuda": "CUDA", "tensorrt": "Tensorrt", "cpu": "CPU"}
    return f"{short.get(name.lower(), name.capitalize())}ExecutionProvider"


def session(
    model,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    level: str = "all",
    optimized_cache: Path | None = None,
):
    """An ``InferenceSession`` for a graph path, a ``ModelProto`` or serialized bytes."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise BackendError(f"graph optimization level {level!r} unknown; use {', '.join(LEVELS)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if optimized_cache is not None:
        optimized_cache.parent.mkdir(parents=True, exist_ok=True)
        opts.optimized_model_filepath = str(optimized_cache)
    if isinstance(model, str | Path):
        source = str(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, opts, providers=choose_providers(providers))
    except FilaError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        where = model if isinstance(model, str | Path) else "the graph"
        raise BackendError(f"onnxruntime cannot load {where}: {exc}") from exc
