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
# ONNX Runtime memory-maps initializers kept in external data, while an inline graph's weights sit
# in the parsed protobuf and are copied into tensors as well: `small`'s w4 decoder (~100 MB) loads
# at 215 instead of 261 MB resident. Graphs with more weights than this keep them outside.
MAPPED_WEIGHTS_ABOVE = 64 * 2**20
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


# Kept in fp32 inside fp16 graphs (the export's and the int8 variants' made for TensorRT): an fp16
# LayerNorm or Softmax loses the precision its sums need (``fila check-trt``'s fp32-norm rule
# looks for the same ops). transformers' RMSNorm computes in fp32 by itself; the residual Adds
# stay in the graph's dtype (as an fp16 TensorRT build runs).
NORM_OPS = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "Softmax",
    "ReduceMean",
)
# The IR version of graphs this toolkit makes itself (weight-only embeddings, benchmark probes):
# what torch's exporter writes, and what every ONNX Runtime since 1.16 reads. onnx's own default
# follows the onnx release (IR 14 with onnx 1.23) and JetPack 6's onnxruntime 1.23 refuses it
# ("Unsupported model IR version ..., max supported IR version: 11").
IR_VERSION = 10


def make_model(graph, opset_imports):
    """``onnx.helper.make_model`` at ``IR_VERSION``."""
    from onnx import helper

    return helper.make_model(graph, opset_imports=opset_imports, ir_version=IR_VERSION)


class BackendError(FilaError):
    """A backend cannot be created with the requested options."""


def data_path(path: Path) -> Path:
    """Where a graph's external data lives: ``<name>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def save(model, path: Path) -> list[Path]:
    """Write ``model``: one file, or the graph plus ``<name>.data`` when its weights are over
    ``MAPPED_WEIGHTS_ABOVE`` (memory-mapped on load); a graph whose weights already live in a
    file keeps pointing there. ``model`` is left as it was (onnx moves the weights out of the
    proto it saves). Returns the files the graph needs (the graph first)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    referenced = external_files(model)
    if referenced:
        onnx.save(model, str(path))
        return [path, *(path.parent / name for name in referenced)]
    data = data_path(path)
    data.unlink(missing_ok=True)
    if model.ByteSize() <= MAPPED_WEIGHTS_ABOVE:
        onnx.save(model, str(path))
        return [path]
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    load_external_data_for_model(model, str(path.parent))  # the caller's proto holds them again
    return [path, data]


def external_files(model) -> list[str]:
    """The external-data files a graph's initializers point into (relative names)."""
    from onnx.external_data_helper import uses_external_data

    names = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and not tensor.HasField("raw_data"):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in names:
                names.append(location)
    return names


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


def graph_bytes(path: Path) -> int:
    """Bytes a graph loads: its file and the external data it points to (its share of a weight
    file several graphs read, not the whole file)."""
    return Path(path).stat().st_size + _external_bytes(load(path, external_data=False))


def initializer_bytes(path: Path) -> int:
    """Bytes of a graph's weights (what a decode step must read), external data included."""
    import onnx

    model = load(path, external_data=False)
    inline = sum(
        len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        for init in model.graph.initializer
        if not any(e.key == "length" for e in init.external_data)
    )
    return inline + _external_bytes(model)


def _external_bytes(model) -> int:
    return sum(
        int(e.value)
        for init in model.graph.initializer
        for e in init.external_data
        if e.key == "length"
    )


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


def cpu_only(providers: Sequence[str] | None) -> bool:
    """Whether these providers (none: the default) run on the CPU provider alone."""
    return not providers or all(_provider_name(p) == "CPUExecutionProvider" for p in providers)


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
    prepack: bool = True,
    arena: bool = True,
    profile: Path | None = None,
):
    """An ``InferenceSession`` for a graph path, a ``ModelProto`` or serialized bytes.
    ``prepack=False`` keeps MatMul weights as they are in memory (memory-mapped external data)
    instead of a second, repacked copy (w4 MatMulNBits then decodes ~30x slower: keep it for
    parity runs). ``arena=False`` gives each run's activations back when the run ends instead of
    keeping the CPU arena at its high-water mark: for graphs run once per image (``edge`` w4:
    peak 6.5 -> 5.3 GB, vision time unchanged). ``profile``: write ONNX Runtime's per-node
    profile under this prefix (``end_profiling()`` returns the file)."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise BackendError(f"graph optimization level {level!r} unknown; use {', '.join(LEVELS)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = arena
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
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
    names = choose_providers(providers)
    where = model if isinstance(model, str | Path) else "the graph"
    if names[0] == "CPUExecutionProvider":
        return _open(ort, source, opts, names, where)
    return _open_on_device(ort, source, opts, names, where)


def _open(ort, source, opts, providers: list[str], where):
    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except FilaError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BackendError(f"onnxruntime cannot load {where}: {exc}") from exc


def _open_on_device(ort, source, opts, providers: list[str], where):
    """A session whose first provider is a device's: the nodes it left on the CPU provider are
    read back (``runtime.backends.onnxruntime.placement``) and compute ones warned about."""
    from runtime.backends.onnxruntime import placement

    if placement.has_assignment_api(ort):
        opts.add_session_config_entry(placement.RECORD_OPTION, "1")
        session = _open(ort, source, opts, providers, where)
        nodes = placement.assigned_to_cpu(session)
    else:  # an older ONNX Runtime: the verbose log of a probe session's creation, then the
        # session itself at the usual log level (a verbose session would log on every run)
        severity, opts.log_severity_level = opts.log_severity_level, 0
        with placement.captured_stderr() as log:
            probe = _open(ort, source, opts, providers, where)
        del probe
        opts.log_severity_level = severity
        session = _open(ort, source, opts, providers, where)
        graph = source if isinstance(source, str) else None
        nodes = placement.cpu_nodes_from_log(
            log[0], lambda: placement.graph_nodes(graph) if graph else []
        )
    placement.warn_fallback(where, providers, nodes)
    return session
