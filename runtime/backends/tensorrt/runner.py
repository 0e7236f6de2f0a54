"""The TensorRT runners: deserialised plans run with ``execute_async_v3`` on a CUDA stream.

Device buffers are allocated once per tensor at the largest shape any profile allows and reused;
the decoder's KV cache lives on the device, time-major, so a step binds ``past`` to the cache
start and ``present`` to the write position: nothing of the cache crosses PCIe/NVLink per token.
The cache is allocated once per runner, grown only when a longer context is asked for, and freed
by ``close()``.
"""

from __future__ import annotations

import time

import numpy as np

from runtime.backends.base import TensorMeta
from runtime.errors import FilaError
from runtime.profiles import Profile, select_profile


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
        self.dtypes = {n: np_dtype(engine.get_tensor_dtype(n), name, n) for n in names}
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
                self.check(
                    self.context.set_input_shape(inp, profile.shapes[inp][2]),
                    "set_input_shape",
                    inp,
                )
            best = max(best, int(np.prod([max(d, 0) for d in self.context.get_tensor_shape(name)])))
        return best

    def check(self, ok, call: str, tensor: str = "") -> None:
        """TensorRT reports failures as a False return (details in its logger): make each one a
        FilaError naming the stage and the call, never a stale output buffer."""
        if ok is False:
            where = f" for {tensor}" if tensor else ""
            raise FilaError(
                f"TensorRT {call}{where} failed in stage {self.name} (its log says why); check the "
                "engine matches this export (fila build) and the input shapes its profiles"
            )

    def bind(self, name: str, address: int) -> None:
        self.check(self.context.set_tensor_address(name, address), "set_tensor_address", name)

    def execute(self) -> None:
        self.check(
            self.context.execute_async_v3(getattr(self.memory, "stream", 0)), "execute_async_v3"
        )

    def _activate(self, index: int) -> None:
        if self.active_profile != index:
            stream = getattr(self.memory, "stream", 0)
            self.check(
                self.context.set_optimization_profile_async(index, stream),
                "set_optimization_profile_async",
            )
            self.active_profile = index

    def _prepare(self, shapes: dict[str, tuple]) -> None:
        self._activate(select_profile(self.profiles, shapes))
        for name, shape in shapes.items():
            self.check(self.context.set_input_shape(name, tuple(shape)), "set_input_shape", name)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._prepare({n: feeds[n].shape for n in self.input_names})
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            self.memory.upload(self.buffers[name], array)
            self.bind(name, self.buffers[name])
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            self.bind(name, self.buffers[name])
        self.execute()
        for name, array in outputs.items():
            self.memory.download(array, self.buffers[name])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return outputs

    def close(self) -> None:
        """Free the device buffers (and the execution context with them)."""
        for ptr in self.buffers.values():
            self.memory.free(ptr)
        self.buffers = {}
        self.context = None


class TrtDecoderRunner(TrtRunner):
    """The decoder with its KV cache on the device (time-major, one block per layer and K/V)."""

    external = ("past.", "present.")

    cache_ptr: int | None = None
    cache_key: tuple | None = None  # (layers, max_len, row shape) the cache was allocated for

    def ensure_cache(self, num_layers: int, max_len: int, row_shape: tuple[int, ...]) -> None:
        """The device KV cache for ``max_len`` positions: kept across requests, reallocated only
        for a longer context (or another layout) than the one it holds."""
        row_shape = tuple(row_shape)  # (batch, kv_heads, head_dim)
        if self.cache_key is not None:
            layers, length, shape = self.cache_key
            if layers == num_layers and shape == row_shape and length >= max_len:
                return
            self.memory.free(self.cache_ptr)
            self.cache_ptr = None
        self.row_shape = row_shape
        self.row_bytes = (
            int(np.prod(row_shape)) * self.dtypes["past.0.key"].itemsize
        )  # engine dtype
        self.num_layers = num_layers
        self.block_bytes = self.row_bytes * max_len
        self.cache_ptr = self.memory.alloc(self.block_bytes * num_layers * 2)
        self.cache_key = (num_layers, max_len, row_shape)

    @property
    def max_len(self) -> int:
        return self.cache_key[1] if self.cache_key else 0

    def close(self) -> None:
        if self.cache_ptr is not None:
            self.memory.free(self.cache_ptr)
            self.cache_ptr, self.cache_key = None, None
        super().close()

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
            self.bind(name, self.buffers[name])
        for i in range(self.num_layers):
            for kv, tag in enumerate(("key", "value")):
                self.bind(f"past.{i}.{tag}", self.cache_address(i, kv, 0))
                self.bind(f"present.{i}.{tag}", self.cache_address(i, kv, past_len))
        logits = np.empty(tuple(self.context.get_tensor_shape("logits")), self.dtypes["logits"])
        self.bind("logits", self.buffers["logits"])
        self.execute()
        self.memory.download(logits, self.buffers["logits"])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return logits


def _is_input(engine, name: str) -> bool:
    mode = engine.get_tensor_mode(name)
    return getattr(mode, "name", str(mode)).endswith("INPUT")


TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
}


def np_dtype(trt_dtype, stage: str, tensor: str) -> np.dtype:
    """The numpy type of an engine tensor; BF16 and FP8 through ml_dtypes; what numpy cannot hold
    (INT4, FP4) is refused, naming the tensor."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name in TRT_TO_NUMPY:
        return np.dtype(TRT_TO_NUMPY[name])
    if name in ("BF16", "FP8"):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16 if name == "BF16" else ml_dtypes.float8_e4m3fn)
    raise FilaError(
        f"stage {stage}: engine tensor {tensor} is {name}, which the runtime cannot feed or read "
        "(it takes fp32, fp16, bf16, fp8 and integer I/O); keep such types inside the graph"
    )


def runner_for(loader, memory=None):
    """The runner for a ``EngineLoader``'s engine: the decoder kind when the stage feeds a KV
    cache (``past.*`` inputs), else the plain one."""
    spec = loader.manifest.spec(loader.stage)
    if memory is None and loader.memory is None:
        from runtime.backends.tensorrt.memory import CudaMemory

        memory = CudaMemory()
    cls = TrtDecoderRunner if any(n.startswith("past.") for n in spec.input_names()) else TrtRunner
    return cls(loader(), loader.profiles(), loader.stage, memory or loader.memory)
