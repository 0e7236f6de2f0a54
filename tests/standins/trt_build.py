"""The TensorRT stand-in's builder: network, ONNX parser, profiles, config, timing cache, and a
plan that is a JSON record of the ONNX file, its hash, the profiles and the flags
(``trt_standin`` says what the stand-in is and is not)."""

from __future__ import annotations

import json
from pathlib import Path

from standins.trt_types import (
    ONNX_TYPES,
    PLAN_MAGIC,
    BuilderFlag,
    DataType,
    Dims,
    IHostMemory,
    ILogger,
    NetworkDefinitionCreationFlag,
    sha256,
)


class ITensor:
    def __init__(self, name: str, shape: Dims, dtype: DataType, is_input: bool) -> None:
        self.name, self.shape, self.dtype, self._input = name, shape, dtype, is_input

    def is_network_input(self) -> bool:
        return self._input

    def is_network_output(self) -> bool:
        return not self._input


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = int(flags)
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._source: dict | None = None  # what the ONNX parser read

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return self._desc


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse_from_file(self, model: str) -> bool:
        """Read the graph's inputs and outputs (names, dtypes, shapes) and hash its files."""
        import onnx

        path = Path(model)
        if not path.is_file():
            self._errors.append(ParserError(f"ONNX file {model} does not exist"))
            return False
        graph = onnx.load(str(path), load_external_data=False)
        files = [path, *(path.parent / name for name in _external_files(graph))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            self._errors.append(ParserError(f"external data missing: {', '.join(missing)}"))
            return False
        net = self._network
        init = {i.name for i in graph.graph.initializer}
        for value in graph.graph.input:
            if value.name not in init:
                net._inputs.append(_tensor(value, True))
        net._outputs = [_tensor(value, False) for value in graph.graph.output]
        net._source = {
            "onnx": str(path.resolve()),
            "files": {str(f.resolve()): sha256(f) for f in files},
            "qdq": any(
                n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.graph.node
            ),
        }
        return True


def _external_files(graph) -> list[str]:
    names = []
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in names:
                names.append(entry.value)
    return names


def _tensor(value, is_input: bool) -> ITensor:
    t = value.type.tensor_type
    dims = Dims(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return ITensor(value.name, dims, ONNX_TYPES[t.elem_type], is_input)


class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}
        self._valid = True

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - TensorRT's names
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        ok = len(lo) == len(mid) == len(hi) and all(
            0 <= a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)
        )
        if not ok:
            self._valid = False  # TensorRT logs the error and marks the profile invalid
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return list(self._shapes.get(input, (Dims(), Dims(), Dims())))

    def __bool__(self) -> bool:
        return self._valid


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self._entries = set(filter(None, bytes(data).decode().split("\n")[1:]))

    def serialize(self) -> IHostMemory:
        return IHostMemory(("standin-timing-cache\n" + "\n".join(sorted(self._entries))).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._entries |= input_cache._entries
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags = 1 << int(BuilderFlag.TF32)  # TF32 is on unless cleared (TensorRT's default)
        self._pools: dict[int, int] = {}
        self._profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None

    def set_flag(self, flag) -> None:
        self.flags |= 1 << int(flag)

    def clear_flag(self, flag) -> None:
        self.flags &= ~(1 << int(flag))

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool) -> int:
        return self._pools.get(int(pool), 8 * 2**30)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    @property
    def platform_has_fast_fp16(self) -> bool:
        return True

    @property
    def platform_has_fast_int8(self) -> bool:
        return True

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        """The plan record, or None with the reason logged (as TensorRT reports a failed build)."""
        problem = _build_problem(network, config)
        if problem:
            self.logger.log(ILogger.ERROR, problem)
            return None
        profiles = [
            {n: [list(s) for s in shapes] for n, shapes in p._shapes.items()}
            for p in config._profiles
        ]
        from standins import trt_standin  # its __version__, which a test may patch

        plan = network._source | {
            "tensorrt": trt_standin.__version__,
            "profiles": profiles,
            "strongly_typed": network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED),
            "builder_flags": [f.name for f in BuilderFlag if config.get_flag(f)],
        }
        if config._cache is not None:
            config._cache._entries.add(next(iter(network._source["files"].values())))
        return IHostMemory(PLAN_MAGIC + json.dumps(plan).encode())


def _build_problem(network: INetworkDefinition, config: IBuilderConfig) -> str | None:
    if network._source is None:
        return "network has no layers (the ONNX parser did not parse a graph into it)"
    dynamic = [t for t in network._inputs if any(d < 0 for d in t.shape)]
    if dynamic and not config._profiles:
        return "network has dynamic inputs but no optimization profile was added to the config"
    for i, profile in enumerate(config._profiles):
        for t in network._inputs:
            if t.name not in profile._shapes:
                if any(d < 0 for d in t.shape):
                    return f"optimization profile {i} has no shape for dynamic input {t.name}"
                continue
            for shape in profile._shapes[t.name]:
                fits = len(shape) == len(t.shape) and all(
                    d < 0 or d == s for d, s in zip(t.shape, shape, strict=True)
                )
                if not fits:
                    return f"profile {i}: shape {shape} of {t.name} does not fit its dims {t.shape}"
    strongly = network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    precision = [f.name for f in PRECISION_FLAGS if config.get_flag(f)]
    if strongly and precision:  # types come from the network (trtexec: --fp16 vs --stronglyTyped)
        return f"a strongly typed network takes no precision flags (set: {', '.join(precision)})"
    if not strongly and network._source["qdq"] and not config.get_flag(BuilderFlag.INT8):
        return "Q/DQ layers in a network that is not strongly typed need BuilderFlag.INT8"
    return None


PRECISION_FLAGS = (BuilderFlag.FP16, BuilderFlag.INT8, BuilderFlag.BF16)
