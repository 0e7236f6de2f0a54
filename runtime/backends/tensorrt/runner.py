"""The TensorRT runners: deserialised plans run with ``execute_async_v3`` on the runner's own CUDA
stream.

Device buffers are allocated once per tensor at the largest shape any profile allows and reused;
the decoder's KV cache lives on the device, time-major, so a step binds ``past`` to the cache
start and ``present`` to the write position: nothing of the cache crosses PCIe or the SoC fabric
per token. TensorRT requires every tensor address to be 256-byte aligned: each layer's cache
block starts aligned, and where a position's offset is not (``row_bytes`` is 64 B for ``tiny`` in
fp16), ``present`` is written to an aligned scratch buffer and copied into the cache on the
device. A runner owns its buffers, its cache, its execution context, its engine and its stream;
``close()`` frees them all, and a runner that fails while it is made frees what it took.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import numpy as np

from runtime.backends.base import TensorMeta
from runtime.errors import FilaError
from runtime.profiles import Profile, select_profile

if TYPE_CHECKING:
    import tensorrt as trt

    from runtime.backends.tensorrt.memory import CudaMemory

ALIGNMENT = 256  # IExecutionContext::setTensorAddress: at least 256-byte aligned addresses
KV_PREFIXES = ("past.", "present.")


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def as_shape(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (it is a sequence by ``__len__`` and ``__getitem__``)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class TrtRunner:
    """One engine: ``infer(dict) -> dict`` with per-profile shape handling."""

    # tensors bound elsewhere (the decoder's KV cache) get no buffer of their own
    external: tuple[str, ...] = ()

    def __init__(
        self,
        engine: trt.ICudaEngine,
        profiles: list[Profile],
        name: str,
        memory: CudaMemory,
        owns_memory: bool = False,
        runtime: trt.Runtime | None = None,
    ) -> None:
        self.name = name
        self.runtime = runtime  # the one that deserialized the engine: it must outlive it
        self.engine: trt.ICudaEngine | None = engine
        self.profiles = profiles
        self.memory = memory
        self.owns_memory = owns_memory
        self.context: trt.IExecutionContext | None = None
        self.buffers: dict[str, int] = {}
        self.active_profile: int | None = None
        self.last_inference_time = 0.0
        try:
            self._setup(engine)
        except BaseException:
            self.close()  # what was allocated before the failure
            raise

    def _setup(self, engine: trt.ICudaEngine) -> None:
        context = engine.create_execution_context()
        if context is None:
            raise FilaError(
                f"TensorRT could not create an execution context for stage {self.name} (out of "
                "GPU memory? fila plan shows what fits)"
            )
        self.context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if _is_input(engine, n)]
        self.output_names = [n for n in names if not _is_input(engine, n)]
        self.dtypes = {n: np_dtype(engine.get_tensor_dtype(n), self.name, n) for n in names}
        self.inputs = [self._meta(engine, n) for n in self.input_names]
        self.outputs = [self._meta(engine, n) for n in self.output_names]
        for n in names:
            if not n.startswith(self.external):
                self.buffers[n] = self.memory.alloc(self._max_bytes(n))  # allocated once

    def _meta(self, engine: trt.ICudaEngine, name: str) -> TensorMeta:
        return TensorMeta(name, str(self.dtypes[name]), as_shape(engine.get_tensor_shape(name)))

    @property
    def stream(self) -> int:
        return int(getattr(self.memory, "stream_handle", 0))

    def _context(self) -> trt.IExecutionContext:
        if self.context is None:
            raise FilaError(f"stage {self.name}: the TensorRT runner was closed")
        return self.context

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
        context = self._context()
        for i, profile in enumerate(self.profiles):
            self._activate(i)
            for inp in self.input_names:
                ok = context.set_input_shape(inp, profile.shapes[inp][2])
                self.check(ok, "set_input_shape", inp)
            best = max(
                best, int(np.prod([max(d, 0) for d in as_shape(context.get_tensor_shape(name))]))
            )
        return best

    def check(self, ok: bool, call: str, tensor: str = "") -> None:
        """TensorRT reports failures as a False return (details in its logger): make each one a
        FilaError naming the stage and the call, never a stale output buffer."""
        if ok is False:
            where = f" for {tensor}" if tensor else ""
            raise FilaError(
                f"TensorRT {call}{where} failed in stage {self.name} (its log says why); check the "
                "engine matches this export (fila build) and the input shapes its profiles"
            )

    def bind(self, name: str, address: int) -> None:
        self.check(self._context().set_tensor_address(name, address), "set_tensor_address", name)

    def execute(self) -> None:
        self.check(self._context().execute_async_v3(self.stream), "execute_async_v3")

    def _activate(self, index: int) -> None:
        if self.active_profile != index:
            ok = self._context().set_optimization_profile_async(index, self.stream)
            self.check(ok, "set_optimization_profile_async")
            self.active_profile = index

    def _prepare(self, shapes: dict[str, tuple]) -> None:
        """Select the profile and set every input shape (switching profiles forgets them)."""
        self._activate(select_profile(self.profiles, shapes))
        context = self._context()
        for name, shape in shapes.items():
            self.check(context.set_input_shape(name, tuple(shape)), "set_input_shape", name)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._prepare({n: feeds[n].shape for n in self.input_names})
        context = self._context()
        self._upload(feeds, self.input_names)
        outputs = {}
        for name in self.output_names:
            shape = as_shape(context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            self.bind(name, self.buffers[name])
        self.execute()
        for name, array in outputs.items():
            self.memory.download(array, self.buffers[name])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return outputs

    def _upload(self, feeds: dict[str, np.ndarray], names: list[str]) -> None:
        """Copy these inputs into their buffers (at the engine's dtype) and bind them."""
        for name in names:
            array = np.ascontiguousarray(feeds[name], self.dtypes[name])
            self.memory.upload(self.buffers[name], array)
            self.bind(name, self.buffers[name])

    def close(self) -> None:
        """Wait for the stream, free the device buffers, then drop the execution context, the
        engine and its runtime (in that order) and destroy the stream; a failing step does not
        keep the later ones from running."""
        buffers, self.buffers = self.buffers, {}
        try:
            if buffers and self.owns_memory:
                self.memory.synchronize()  # nothing in flight reads or writes what is freed
        finally:
            try:
                for ptr in buffers.values():
                    with contextlib.suppress(FilaError):  # one bad free must not leak the rest
                        self.memory.free(ptr)
            finally:
                self.context = None  # before the engine it was made from
                self.engine = None  # before the runtime that made it
                self.runtime = None
                if self.owns_memory and self.memory is not None:
                    self.memory.close()

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrtDecoderRunner(TrtRunner):
    """The decoder with its KV cache on the device (time-major, one block per layer and K/V)."""

    external = KV_PREFIXES

    cache_ptr: int | None = None
    cache_key: tuple | None = None  # (layers, max_len, row shape) the cache was allocated for
    scratch_ptr: int | None = None  # aligned ``present`` slots for unaligned write positions
    scratch_bytes = 0

    def ensure_cache(self, num_layers: int, max_len: int, row_shape: tuple[int, ...]) -> None:
        """The device KV cache for ``max_len`` positions: kept across requests, reallocated only
        for a longer context (or another layout) than the one it holds."""
        row_shape = tuple(row_shape)  # (batch, kv_heads, head_dim)
        if self.cache_key is not None:
            layers, length, shape = self.cache_key
            if layers == num_layers and shape == row_shape and length >= max_len:
                return
            self._free_cache()
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape)) * self.dtypes["past.0.key"].itemsize
        self.num_layers = num_layers
        self.block_bytes = aligned(self.row_bytes * max_len)  # every block starts aligned
        self.cache_ptr = self.memory.alloc(self.block_bytes * num_layers * 2)
        self.cache_key = (num_layers, max_len, row_shape)

    @property
    def max_len(self) -> int:
        return self.cache_key[1] if self.cache_key else 0

    @property
    def kv_layers(self) -> int:
        return sum(n.startswith("past.") for n in self.input_names) // 2

    def _free_cache(self) -> None:
        for attr in ("cache_ptr", "scratch_ptr"):
            ptr = getattr(self, attr)
            if ptr is not None:
                setattr(self, attr, None)
                self.memory.free(ptr)
        self.cache_key, self.scratch_bytes = None, 0

    def close(self) -> None:
        try:
            if self.owns_memory and self.cache_ptr is not None:
                self.memory.synchronize()
            self._free_cache()
        finally:
            super().close()

    def cache_address(self, layer: int, kv: int, position: int) -> int:
        if self.cache_ptr is None:
            raise FilaError(f"stage {self.name}: no KV cache allocated (ensure_cache first)")
        return self.cache_ptr + (layer * 2 + kv) * self.block_bytes + position * self.row_bytes

    def _scratch(self, seq: int) -> int:
        """Aligned room for ``seq`` positions of every layer's K and V (grown when needed)."""
        need = aligned(seq * self.row_bytes) * self.num_layers * 2
        if need > self.scratch_bytes:
            if self.scratch_ptr is not None:
                self.memory.free(self.scratch_ptr)
                self.scratch_ptr = None
            self.scratch_ptr = self.memory.alloc(need)
            self.scratch_bytes = need
        return self.scratch_ptr or 0

    def _bind_cache(self, past_len: int, seq: int) -> list[tuple[int, int]]:
        """Bind past to each block's start and present to its write position, or to a scratch
        slot where that position is not 256-byte aligned; returns the (cache, scratch) copies
        to make after the step."""
        copies = []
        slot = aligned(seq * self.row_bytes)
        for i, kv, tag in self._kv():
            self.bind(f"past.{i}.{tag}", self.cache_address(i, kv, 0))
            target = self.cache_address(i, kv, past_len)
            if target % ALIGNMENT:
                scratch = self._scratch(seq) + (i * 2 + kv) * slot
                copies.append((target, scratch))
                target = scratch
            self.bind(f"present.{i}.{tag}", target)
        return copies

    def _kv(self):
        """(layer, 0 for K / 1 for V, "key" / "value") of every cache tensor."""
        for i in range(self.num_layers):
            for kv, tag in enumerate(("key", "value")):
                yield i, kv, tag

    def run_step(self, feeds: dict[str, np.ndarray], past_len: int, seq: int) -> np.ndarray:
        """Run prefill/decode; past is read from and present written into the device cache."""
        if past_len + seq > self.max_len:
            raise FilaError(f"KV cache full: {past_len} + {seq} > {self.max_len}")
        t0 = time.perf_counter()
        plain = [n for n in self.input_names if not n.startswith("past.")]
        shapes = {n: feeds[n].shape for n in plain}
        shapes |= {f"past.{i}.{tag}": (past_len, *self.row_shape) for i, _, tag in self._kv()}
        self._prepare(shapes)
        self._upload(feeds, plain)
        copies = self._bind_cache(past_len, seq)
        logits = np.empty(
            as_shape(self._context().get_tensor_shape("logits")), self.dtypes["logits"]
        )
        self.bind("logits", self.buffers["logits"])
        self.execute()
        for dst, src in copies:
            self.memory.copy(dst, src, seq * self.row_bytes)
        self.memory.download(logits, self.buffers["logits"])
        self.memory.synchronize()
        self.last_inference_time = time.perf_counter() - t0
        return logits

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call as the graph's contract has it (``past.*`` in, ``present.*`` out), as
        validation runs every stage: the past is uploaded into the device cache, the step runs
        on it, and the new positions are read back."""
        past = feeds["past.0.key"]
        past_len, row_shape = past.shape[0], tuple(past.shape[1:])
        seq = feeds["inputs_embeds"].shape[1]
        self.ensure_cache(self.kv_layers, past_len + seq, row_shape)
        dtype = self.dtypes["past.0.key"]
        for i, kv, tag in self._kv():
            array = np.ascontiguousarray(feeds[f"past.{i}.{tag}"], dtype)
            self.memory.upload(self.cache_address(i, kv, 0), array)
        outputs = {"logits": self.run_step(feeds, past_len, seq)}
        for i, kv, tag in self._kv():
            present = np.empty((seq, *row_shape), dtype)
            self.memory.download(present, self.cache_address(i, kv, past_len))
            outputs[f"present.{i}.{tag}"] = present
        self.memory.synchronize()
        return outputs


def _is_input(engine: trt.ICudaEngine, name: str) -> bool:
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


def runner_for(loader, memory=None) -> TrtRunner:
    """The runner for an ``EngineLoader``'s engine (the decoder kind when the stage feeds a KV
    cache): it gets its own CUDA stream and memory unless one is given, and nothing it took is
    kept when the load fails."""
    spec = loader.manifest.spec(loader.stage)
    memory = memory or loader.memory
    owns = memory is None
    if owns:
        from runtime.backends.tensorrt.memory import CudaMemory

        memory = CudaMemory()
    try:
        cls = (
            TrtDecoderRunner
            if any(n.startswith("past.") for n in spec.input_names())
            else TrtRunner
        )
        engine = loader()
        return cls(engine, loader.profiles(), loader.stage, memory, owns, loader.runtime)
    except BaseException:
        if owns:
            memory.close()
        raise
