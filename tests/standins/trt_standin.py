"""A STAND-IN for TensorRT 10's Python API: the parts ``fila build`` and the TensorRT runner call,
for tests on machines with neither a GPU nor TensorRT. It is not TensorRT.

A "plan" it builds is a JSON record of the ONNX file (path and sha256 of the graph and its
external data), the optimization profiles, the network flags and the builder flags; an "engine"
runs that same ONNX graph on ONNX Runtime's CPU provider, reading its inputs from and writing its
outputs to "device memory" of the cuda-python stand-in (``cudart_standin``: host memory).

It enforces what TensorRT documents and the runner relies on, and raises ``StandInViolation``
(naming the rule) where real TensorRT would compute garbage or crash:
- every I/O tensor's address is set before ``execute_async_v3``, each 256-byte aligned and
  inside a live device allocation large enough for the tensor at its current shape and dtype;
- input shapes lie inside the active profile (``set_input_shape`` returns False, as TensorRT's
  does); switching profiles forgets the input shapes (they must be set again);
- an output's shape is asked for only once every input shape is set;
- the engine's I/O dtypes are the graph's; the stream is one cudaStreamCreate made;
- a plan is refused (``deserialize_cuda_engine`` -> None) when it was built by another TensorRT
  version or its ONNX file changed; strongly typed networks are the default; without strong
  typing (TensorRT 8.x/9.x, ``__version__`` patched by a test) Q/DQ graphs need BuilderFlag.INT8.
What it does not prove: TensorRT's numerics (fp16/int8 kernels, fusions, tactics), speed, device
memory use, or that TensorRT's ONNX parser accepts an operator (``fila check-trt`` checks that).
Its surface is held to NVIDIA's published type stubs (``tests/test_trt_standin.py``).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np

from standins import cudart_standin as cudart
from standins.trt_build import (
    Builder,
    IBuilderConfig,
    INetworkDefinition,
    IOptimizationProfile,
    ITensor,
    ITimingCache,
    OnnxParser,
    ParserError,
)
from standins.trt_types import (
    ALIGNMENT,
    NUMPY,
    PLAN_MAGIC,
    VIOLATIONS,
    BuilderFlag,
    DataType,
    Dims,
    IHostMemory,
    ILogger,
    Logger,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    StandInViolation,
    TensorIOMode,
    sha256,
)

__version__ = "10.13.0.35+standin"
STANDIN = True
STANDIN_ONLY = {"STANDIN", "PLAN_MAGIC", "ALIGNMENT", "STANDIN_ONLY", "StandInViolation"}
STANDIN_ONLY |= {"ONNX_TYPES", "NUMPY", "sha256", "cudart", "VIOLATIONS", "weakref"}
__all__ = [  # TensorRT's names the stand-in offers
    "Builder",
    "BuilderFlag",
    "DataType",
    "Dims",
    "IBuilderConfig",
    "ICudaEngine",
    "IExecutionContext",
    "IHostMemory",
    "ILogger",
    "INetworkDefinition",
    "IOptimizationProfile",
    "ITensor",
    "ITimingCache",
    "Logger",
    "MemoryPoolType",
    "NetworkDefinitionCreationFlag",
    "OnnxParser",
    "ParserError",
    "Runtime",
    "TensorIOMode",
]


# --- running -----------------------------------------------------------------------------------
class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self._engines: weakref.WeakSet = weakref.WeakSet()

    def __del__(self) -> None:
        if len(self._engines):  # TensorRT: "destroying a runtime before destroying deserialized
            VIOLATIONS.append(  # engines created by the runtime leads to undefined behavior"
                f"a Runtime was destroyed while {len(self._engines)} of its engines lived"
            )

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            self.logger.log(ILogger.ERROR, "the plan is not a serialized engine (magic tag)")
            return None
        plan = json.loads(data[len(PLAN_MAGIC) :])
        if plan["tensorrt"] != __version__:
            self.logger.log(
                ILogger.ERROR,
                f"the plan was built by TensorRT {plan['tensorrt']}, this is {__version__}",
            )
            return None
        for name, sha in plan["files"].items():
            if not Path(name).is_file() or sha256(Path(name)) != sha:
                self.logger.log(ILogger.ERROR, f"{name} changed since the plan was built")
                return None
        engine = ICudaEngine(plan, self.logger)
        self._engines.add(engine)
        return engine


class ICudaEngine:
    def __init__(self, plan: dict, logger: ILogger) -> None:
        import onnxruntime as ort

        self._plan, self._logger = plan, logger
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(plan["onnx"], opts, providers=["CPUExecutionProvider"])
        io = [(v, TensorIOMode.INPUT) for v in self._session.get_inputs()]
        io += [(v, TensorIOMode.OUTPUT) for v in self._session.get_outputs()]
        self._names = [v.name for v, _ in io]
        self._modes = {v.name: mode for v, mode in io}
        self._dtypes = {v.name: _ort_dtype(v.type) for v, _ in io}
        self._shapes = {
            v.name: Dims(d if isinstance(d, int) else -1 for d in v.shape) for v, _ in io
        }
        self._output_shapes: dict[tuple, dict[str, tuple]] = {}

    @property
    def name(self) -> str:
        return Path(self._plan["onnx"]).stem

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._plan["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._modes.get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._dtypes[name]

    def get_tensor_shape(self, name: str) -> Dims:
        return self._shapes[name]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        shapes = self._plan["profiles"][profile_index].get(name)
        return [Dims(s) for s in shapes] if shapes else []

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        return IHostMemory(PLAN_MAGIC + json.dumps(self._plan).encode())

    def _outputs_for(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """Output shapes at these input shapes: the graph run once on zeros (cached)."""
        key = tuple(sorted(shapes.items()))
        if key not in self._output_shapes:
            feeds = {n: np.zeros(s, NUMPY[self._dtypes[n]]) for n, s in shapes.items()}
            names = [n for n in self._names if self._modes[n] == TensorIOMode.OUTPUT]
            values = self._session.run(names, feeds)
            self._output_shapes[key] = {n: v.shape for n, v in zip(names, values, strict=True)}
        return self._output_shapes[key]


def _ort_dtype(text: str) -> DataType:
    name = text.removeprefix("tensor(").removesuffix(")")
    table = {"float": DataType.FLOAT, "float16": DataType.HALF, "int32": DataType.INT32}
    table |= {"int64": DataType.INT64, "bool": DataType.BOOL, "int8": DataType.INT8}
    table |= {"uint8": DataType.UINT8, "bfloat16": DataType.BF16}
    return table[name]


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._profile = 0
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def _inputs(self) -> list[str]:
        e = self.engine
        return [n for n in e._names if e._modes[n] == TensorIOMode.INPUT]

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            self.engine._logger.log(ILogger.ERROR, f"no optimization profile {profile_index}")
            return False
        _check_stream(stream_handle)
        self._profile = profile_index
        self._shapes.clear()  # switching profiles invalidates every input shape
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        e, shape = self.engine, tuple(int(d) for d in shape)
        if e.get_tensor_mode(name) != TensorIOMode.INPUT:
            e._logger.log(ILogger.ERROR, f"{name} is not an input tensor of the engine")
            return False
        dims = tuple(e._shapes[name])
        bounds = e.get_tensor_profile_shape(name, self._profile)
        ok = len(shape) == len(dims) and all(
            d < 0 or d == s for d, s in zip(dims, shape, strict=False)
        )
        if ok and bounds:
            lo, _, hi = bounds
            ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))
        if not ok:
            e._logger.log(
                ILogger.ERROR,
                f"set_input_shape: {name} {shape} is outside profile {self._profile} "
                f"({[tuple(b) for b in bounds]}) or the tensor's dims {dims}",
            )
            return False
        self._shapes[name] = shape
        return True

    def infer_shapes(self) -> list[str]:
        return [n for n in self._inputs() if n not in self._shapes]

    def get_tensor_shape(self, name: str) -> Dims:
        e = self.engine
        if e.get_tensor_mode(name) == TensorIOMode.INPUT:
            return Dims(self._shapes.get(name, tuple(e._shapes[name])))
        missing = self.infer_shapes()
        if missing:
            raise StandInViolation(
                f"output shape of {name} asked before every input shape was set (missing: "
                f"{', '.join(missing)}); TensorRT returns -1 dimensions here"
            )
        return Dims(e._outputs_for(self._shapes)[name])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        e, memory = self.engine, int(memory)
        if e.get_tensor_mode(name) == TensorIOMode.NONE:
            e._logger.log(ILogger.ERROR, f"{name} is not an I/O tensor of the engine")
            return False
        if memory % ALIGNMENT:
            raise StandInViolation(
                f"address {memory:#x} of {name} is not {ALIGNMENT}-byte aligned "
                f"(off by {memory % ALIGNMENT}); TensorRT requires it"
            )
        try:
            cudart.device_view(memory, 1)
        except ValueError as exc:
            raise StandInViolation(f"address of {name}: {exc}") from None
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        _check_stream(stream_handle)
        e = self.engine
        missing = self.infer_shapes()
        if missing:
            raise StandInViolation(f"execute_async_v3 before the shapes of {', '.join(missing)}")
        unset = [n for n in e._names if n not in self._addresses]
        if unset:
            raise StandInViolation(f"execute_async_v3 with no address for {', '.join(unset)}")
        outputs = e._outputs_for(self._shapes)
        feeds = {n: np.array(self._view(n, s)) for n, s in self._shapes.items()}
        values = e._session.run(list(outputs), feeds)
        for (name, shape), value in zip(outputs.items(), values, strict=True):
            self._view(name, shape)[...] = value
        return True

    def _view(self, name: str, shape: tuple) -> np.ndarray:
        dtype = np.dtype(NUMPY[self.engine._dtypes[name]])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        try:
            raw = cudart.device_view(self._addresses[name], nbytes)
        except ValueError as exc:
            raise StandInViolation(f"{name} {shape} {dtype}: {exc}") from None
        return raw.view(dtype).reshape(shape)


def _check_stream(handle) -> None:
    if int(handle) != 0 and not cudart.is_live_stream(int(handle)):
        raise StandInViolation(f"stream {int(handle):#x} is not a live cudaStreamCreate stream")
