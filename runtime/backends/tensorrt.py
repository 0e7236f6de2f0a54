"""Native TensorRT backend: deserialised plans run with ``execute_async_v3`` on a CUDA stream.

Device buffers are allocated once per tensor at the largest shape any profile allows and reused;
the decoder's KV cache lives on the device, time-major, so a step binds ``past`` to the cache
start and ``present`` to the write position: nothing of the cache crosses PCIe/NVLink per token.
Device memory goes through a small ``DeviceMemory`` interface (cuda-python), which tests replace
with a host fake to exercise the buffer and profile logic without a GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from runtime.backends.base import TensorMeta
from runtime.errors import EngineMismatchError, FilaError
from runtime.manifest import safe_path
from runtime.profiles import Profile, select_profile

REBUILD = "rebuild it on this machine: fila build --artifacts {art} --stages {stage}"


class CudaMemory:
    """Device memory and copies through cuda-python's runtime API."""

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
            raise FilaError(f"CUDA error {err}")
        return rest[0] if rest else None

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.cudart.cudaMalloc(max(nbytes, 1))))

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

    def memset(self, ptr: int, nbytes: int) -> None:
        self._check(self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream))

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))


def check_build_info(
    info: dict,
    entry: dict,
    source_sha256: str,
    trt_version: str,
    gpu_name: str | None,
    artifacts: Path,
    stage: str,
) -> None:
    """Refuse a plan built for another TensorRT, GPU or ONNX file."""
    fix = REBUILD.format(art=artifacts, stage=stage)
    if info.get("tensorrt") != trt_version:
        raise EngineMismatchError(
            f"{entry['plan']} was built with TensorRT {info.get('tensorrt')}, this is {trt_version}; {fix}"
        )
    if gpu_name is not None and info.get("gpu", {}).get("name") != gpu_name:
        raise EngineMismatchError(
            f"{entry['plan']} was built on {info.get('gpu', {}).get('name')}, this GPU is {gpu_name}; {fix}"
        )
    if entry.get("source_sha256") != source_sha256:
        raise EngineMismatchError(
            f"{entry['plan']} was built from another {entry.get('source_onnx')} (the export changed); {fix}"
        )


class TrtRunner:
    """One engine: ``infer(dict) -> dict`` with per-profile shape handling."""

    # tensors bound elsewhere (the decoder's KV cache) get no buffer of their own
    external: tuple[str, ...] = ()

    def __init__(self, engine, profiles: list[Profile], name: str, memory) -> None:
        self.name = name
        self.engine = engine
        self.context = engine.create_execution_context()
        self.profiles = profiles
        self.memory = memory
        self.active_profile: int | None = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if _is_input(engine, n)]
        self.output_names = [n for n in names if not _is_input(engine, n)]
        self.dtypes = {n: np.dtype(_np_dtype(engine.get_tensor_dtype(n))) for n in names}
        self.inputs = [
            TensorMeta(n, str(self.dtypes[n]), tuple(engine.get_tensor_shape(n)))
            for n in self.input_names
        ]
        self.outputs = [
            TensorMeta(n, str(self.dtypes[n]), tuple(engine.get_tensor_shape(n)))
            for n in self.output_names
        ]
        owned = [n for n in names if not n.startswith(self.external)]
        self.capacity = {n: self._max_bytes(n) for n in owned}
        self.buffers = {n: memory.alloc(self.capacity[n]) for n in owned}  # allocated once
        self.last_inference_time = 0.0

    def _max_bytes(self, name: str) -> int:
        """Largest size of a tensor over every profile (inputs from profiles, outputs from engine)."""
        if name in self.input_names:
            volume = max(int(np.prod(p.shapes[name][2])) for p in self.profiles if name in p.shapes)
        else:
            volume = self._output_max_volume(name)
        return volume * self.dtypes[name].itemsize

    def _output_max_volume(self, name: str) -> int:
        """Output shapes at each profile's max input shapes, as the context reports them."""
        best = 1
        for i, profile in enumerate(self.profiles):
            self._activate(i)
            for inp in self.input_names:
                self.context.set_input_shape(inp, profile.shapes[inp][2])
            best = max(best, int(np.prod([max(d, 0) for d in self.context.get_tensor_shape(name)])))
        return best

    def _activate(self, index: int) -> None:
        if self.active_profile != index:
            self.context.set_optimization_profile_async(index, getattr(self.memory, "stream", 0))
            self.active_profile = index

    def _prepare(self, shapes: dict[str, tuple]) -> None:
        self._activate(select_profile(self.profiles, shapes))
        for name, shape in shapes.items():
            self.context.set_input_shape(name, tuple(shape))

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._prepare({n: feeds[n].shape for n in self.input_names})
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            self.memory.upload(self.buffers[name], array)
            self.context.set_tensor_address(name, self.buffers[name])
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self.buffers[name])
        self.context.execute_async_v3(getattr(self.memory, "stream", 0))
        for name, array in outputs.items():
            self.memory.download(array, self.buffers[name])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return outputs


class TrtDecoderRunner(TrtRunner):
    """The decoder with its KV cache on the device (time-major, one block per layer and K/V)."""

    external = ("past.", "present.")

    def allocate_cache(self, num_layers: int, max_len: int, row_shape: tuple[int, ...]) -> None:
        self.row_shape = tuple(row_shape)  # (batch, kv_heads, head_dim)
        self.row_bytes = int(np.prod(row_shape)) * np.dtype(np.float32).itemsize
        self.max_len = max_len
        self.num_layers = num_layers
        block = self.row_bytes * max_len
        self.cache_ptr = self.memory.alloc(block * num_layers * 2)
        self.block_bytes = block

    def cache_address(self, layer: int, kv: int, position: int) -> int:
        return self.cache_ptr + (layer * 2 + kv) * self.block_bytes + position * self.row_bytes

    def run_step(self, feeds: dict[str, np.ndarray], past_len: int, seq: int) -> np.ndarray:
        """Run prefill/decode; past is read from and present written into the device cache."""
        if past_len + seq > self.max_len:
            raise FilaError(f"KV cache full: {past_len} + {seq} > {self.max_len}")
        t0 = time.perf_counter()
        shapes = {n: feeds[n].shape for n in ("inputs_embeds", "attention_mask", "position_ids")}
        for i in range(self.num_layers):
            for tag in ("key", "value"):
                shapes[f"past.{i}.{tag}"] = (past_len, *self.row_shape)
        self._prepare(shapes)
        for name in ("inputs_embeds", "attention_mask", "position_ids"):
            self.memory.upload(
                self.buffers[name], np.ascontiguousarray(feeds[name], self.dtypes[name])
            )
            self.context.set_tensor_address(name, self.buffers[name])
        for i in range(self.num_layers):
            for kv, tag in enumerate(("key", "value")):
                self.context.set_tensor_address(f"past.{i}.{tag}", self.cache_address(i, kv, 0))
                self.context.set_tensor_address(
                    f"present.{i}.{tag}", self.cache_address(i, kv, past_len)
                )
        logits = np.empty(tuple(self.context.get_tensor_shape("logits")), np.float32)
        self.context.set_tensor_address("logits", self.buffers["logits"])
        self.context.execute_async_v3(getattr(self.memory, "stream", 0))
        self.memory.download(logits, self.buffers["logits"])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return logits


def gpu_info() -> dict:
    """Name and compute capability of GPU 0 via cuda-python (or torch when present)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return {
                "name": name.rstrip("\x00"),
                "compute_capability": f"{props.major}.{props.minor}",
            }
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    raise FilaError("no CUDA GPU found (cuda-python or torch could not see device 0)")


def jetson_release() -> str | None:
    """L4T release from /etc/nv_tegra_release (JetPack 6 is L4T R36), or None off Jetson."""
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    return path.read_text().splitlines()[0].strip()


def _is_input(engine, name: str) -> bool:
    mode = engine.get_tensor_mode(name)
    return getattr(mode, "name", str(mode)).endswith("INPUT")


def _np_dtype(trt_dtype) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    return {
        "FLOAT": "float32",
        "HALF": "float16",
        "INT32": "int32",
        "INT64": "int64",
        "BOOL": "bool",
        "INT8": "int8",
        "UINT8": "uint8",
        "BF16": "float32",
    }[name]


def load_engine_runner(onnx_path: Path, name: str, precision: str | None = None, memory=None):
    """Loader used by the pipeline: the plan built from ``onnx_path``'s stage, checked against
    this machine (TensorRT version, GPU, source ONNX hash)."""
    from runtime.manifest import Manifest
    from runtime.profiles import stage_profiles

    onnx_path = Path(onnx_path)
    artifacts = onnx_path.parent
    manifest = Manifest.load(artifacts, verify=False)
    info_path = artifacts / "engines" / "build_info.json"
    if not info_path.is_file():
        raise EngineMismatchError(
            f"no engines in {artifacts / 'engines'}; build them: fila build --artifacts {artifacts}"
        )
    info = json.loads(info_path.read_text())
    entry = next(
        (
            e
            for e in info["engines"].values()
            if e["stage"] == name and e["source_onnx"] == onnx_path.name
        ),
        None,
    )
    if entry is None:
        raise EngineMismatchError(
            f"no engine for stage {name} from {onnx_path.name}; {REBUILD.format(art=artifacts, stage=name)}"
        )
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FilaError(
            "the tensorrt backend needs TensorRT (JetPack's python3-libnvinfer)"
        ) from exc
    source = manifest.variant(name, entry["precision"])["sha256"]
    check_build_info(info, entry, source, trt.__version__, gpu_info()["name"], artifacts, name)
    plan = safe_path(artifacts / "engines", entry["plan"])
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise EngineMismatchError(
            f"TensorRT could not deserialize {plan}; {REBUILD.format(art=artifacts, stage=name)}"
        )
    memory = memory or CudaMemory()
    cls = TrtDecoderRunner if name == "decoder" else TrtRunner
    return cls(engine, stage_profiles(manifest, name), name, memory)
