"""The TensorRT runner's buffer and profile logic, on CPU, against a fake engine that records calls.

This does not test TensorRT itself (no GPU here): it tests that our runner picks the profile for
the input shapes, allocates device buffers once, binds the decoder's KV cache at the right offsets
and refuses engines built for another TensorRT, GPU or ONNX file.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.backends.tensorrt import TrtDecoderRunner, TrtRunner, check_build_info
from runtime.errors import EngineMismatchError, FilaError
from runtime.generate import Decoder, DecoderShape, SamplingParams, generate
from runtime.profiles import Profile

pytestmark = pytest.mark.board


class FakeMemory:
    """Device memory as one host arena; pointers are offsets into it."""

    def __init__(self, size=1 << 22):
        self.arena = np.zeros(size, dtype=np.uint8)
        self.next = 256
        self.allocs = []
        self.frees = []
        self.live = {}

    def alloc(self, nbytes):
        ptr = self.next
        self.next += (nbytes + 255) // 256 * 256
        self.allocs.append(nbytes)
        self.live[ptr] = nbytes
        return ptr

    def free(self, ptr):
        self.frees.append(self.live.pop(ptr))

    def view(self, ptr, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.arena[ptr : ptr + n].view(dtype).reshape(shape)

    def upload(self, ptr, array):
        self.view(ptr, array.dtype, array.shape)[...] = array

    def download(self, array, ptr):
        array[...] = self.view(ptr, array.dtype, array.shape)

    def copy(self, dst, src, nbytes):
        self.arena[dst : dst + nbytes] = self.arena[src : src + nbytes]

    def synchronize(self):
        pass


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.calls = engine, {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index))

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        return (
            self.engine.output_shape(name, self.shapes)
            if name in self.engine.outs
            else self.shapes[name]
        )

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self.calls.append(("execute", dict(self.shapes)))
        self.engine.compute(self)


class FakeEngine:
    def __init__(self, ins, outs, memory):
        self.ins, self.outs, self.memory = ins, outs, memory  # name -> dtype
        self.names = [*ins, *outs]
        self.num_io_tensors = len(self.names)
        self.contexts = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return SimpleNamespace(name="INPUT" if name in self.ins else "OUTPUT")

    def get_tensor_dtype(self, name):
        return SimpleNamespace(
            name={"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}[
                ({**self.ins, **self.outs})[name]
            ]
        )

    def get_tensor_shape(self, name):
        return (-1, -1)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class DoublingEngine(FakeEngine):
    """y = 2x, shaped like x."""

    def output_shape(self, name, shapes):
        return shapes["x"]

    def compute(self, ctx):
        x = self.memory.view(ctx.addresses["x"], np.float32, ctx.shapes["x"])
        self.memory.view(ctx.addresses["y"], np.float32, ctx.shapes["x"])[...] = 2 * x


def test_profile_selection_and_buffers_allocated_once():
    mem = FakeMemory()
    engine = DoublingEngine({"x": "float32"}, {"y": "float32"}, mem)
    profiles = [
        Profile("small", {"x": ((1, 4), (2, 4), (3, 4))}),
        Profile("big", {"x": ((4, 4), (5, 4), (8, 4))}),
    ]
    runner = TrtRunner(engine, profiles, "double", mem)
    allocated = list(mem.allocs)
    assert allocated == [8 * 4 * 4, 8 * 4 * 4]  # x and y at the largest profile shape
    for rows, profile in [(2, 0), (6, 1), (3, 0)]:
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], 2 * x)
        assert ("profile", profile) in runner.context.calls
    assert mem.allocs == allocated  # nothing allocated per call
    switches = [c for c in runner.context.calls if c[0] == "profile"]
    assert [s[1] for s in switches][-3:] == [0, 1, 0]
    with pytest.raises(Exception, match="outside every optimization profile"):
        runner.infer({"x": np.zeros((9, 4), np.float32)})


class KvEngine(FakeEngine):
    """A decoder whose present = position ids (per row) and logits[b, 0] = sum of past keys."""

    def output_shape(self, name, shapes):
        seq, batch = shapes["position_ids"][1], shapes["position_ids"][0]
        return (batch, 5) if name == "logits" else (seq, batch, 1, 2)

    def compute(self, ctx):
        m = self.memory
        pos = m.view(ctx.addresses["position_ids"], np.int64, ctx.shapes["position_ids"])
        past_shape = ctx.shapes["past.0.key"]
        past = m.view(ctx.addresses["past.0.key"], np.float32, past_shape)
        seq, batch = pos.shape[1], pos.shape[0]
        logits = np.zeros((batch, 5), np.float32)
        logits[:, 0] = past.sum(axis=(0, 2, 3)) if past_shape[0] else 0
        m.view(ctx.addresses["logits"], np.float32, (batch, 5))[...] = logits
        for tag in ("key", "value"):
            present = m.view(ctx.addresses[f"present.0.{tag}"], np.float32, (seq, batch, 1, 2))
            present[...] = pos.T[:, :, None, None]


def kv_runner(mem, cache="float32"):
    """A ``TrtDecoderRunner`` on the fake KV engine, profiles for up to 16 positions."""
    ins = {
        "inputs_embeds": "float32",
        "attention_mask": "int64",
        "position_ids": "int64",
        "past.0.key": cache,
        "past.0.value": cache,
    }
    outs = {"logits": "float32", "present.0.key": cache, "present.0.value": cache}
    engine = KvEngine(ins, outs, mem)

    def shapes(batch, seq, past):
        return {
            "inputs_embeds": (batch, seq, 3),
            "attention_mask": (batch, past + seq),
            "position_ids": (batch, seq),
            "past.0.key": (past, batch, 1, 2),
            "past.0.value": (past, batch, 1, 2),
        }

    prefill = Profile(
        "prefill", {k: (v, v, shapes(1, 16, 0)[k]) for k, v in shapes(1, 1, 0).items()}
    )
    decode = Profile("decode", {k: (v, v, shapes(1, 1, 15)[k]) for k, v in shapes(1, 1, 1).items()})
    return TrtDecoderRunner(engine, [prefill, decode], "decoder", mem)


SHAPE = DecoderShape(num_layers=1, kv_heads=1, head_dim=2, vocab=5)


def test_decoder_kv_cache_bound_in_place():
    mem = FakeMemory()
    runner = kv_runner(mem)
    assert not any(n.startswith(("past.", "present.")) for n in runner.buffers)
    decoder = Decoder(runner, SHAPE, batch=1, max_len=16)
    setup_calls = len(runner.context.calls)  # output sizing visits each profile once
    logits = decoder.prefill(np.zeros((1, 4, 3), np.float32), np.ones((1, 4), np.int64))
    assert logits[0, 0] == 0  # empty past
    logits = decoder.decode_one_token(np.zeros((1, 1, 3), np.float32))
    assert logits[0, 0] == 2 * (0 + 1 + 2 + 3)  # past = the four prefill positions, 2 dims each
    logits = decoder.decode_one_token(np.zeros((1, 1, 3), np.float32))
    assert logits[0, 0] == 2 * (0 + 1 + 2 + 3 + 4)
    ctx = runner.context
    assert ctx.addresses["past.0.key"] == runner.cache_address(0, 0, 0)
    # position 5 of 8-byte rows is not 256-byte aligned: present goes to an aligned scratch slot,
    # copied into the cache on the device after the step (the sums above read it back)
    assert runner.cache_address(0, 0, 5) % 256 and ctx.addresses["present.0.key"] % 256 == 0
    assert ctx.addresses["present.0.key"] == runner.scratch_ptr
    profiles_used = [c[1] for c in ctx.calls[setup_calls:] if c[0] == "profile"]
    assert profiles_used == [0, 1]  # prefill profile, then decode profile; no switch per token


def test_device_kv_cache_is_allocated_once_per_runner_and_freed_on_close():
    """Every generate builds a Decoder; the device cache is allocated once, grown only for a
    longer context, and freed by close() (it used to leak one cache per generate)."""
    mem = FakeMemory()
    runner = kv_runner(mem)
    io_buffers = len(mem.allocs)
    # layers x K/V x (positions x row x fp32 = 128 B, each block rounded up to 256-B alignment)
    cache_bytes = 1 * 2 * 256
    scratch_bytes = 1 * 2 * 256  # one aligned present slot per layer and K/V

    def one_generate(max_len):
        out = generate(
            Decoder(runner, SHAPE, 1, max_len),
            lambda ids: np.zeros((1, 1, 3), np.float32),
            np.zeros((1, 4, 3), np.float32),
            np.ones((1, 4), np.int64),
            max_len - 4,
            SamplingParams(),
        )
        assert len(out.token_ids[0]) == max_len - 4

    for _ in range(3):
        one_generate(16)
    one_generate(8)  # a shorter context reuses the cache too
    assert mem.allocs[io_buffers:] == [cache_bytes, scratch_bytes] and mem.frees == []
    runner.close()
    assert mem.frees[:2] == [cache_bytes, scratch_bytes] and mem.live == {}  # all freed


def test_a_longer_context_grows_the_cache_once():
    mem = FakeMemory()
    runner = kv_runner(mem)
    io_buffers = len(mem.allocs)
    runner.ensure_cache(1, 8, (1, 1, 2))
    runner.ensure_cache(1, 8, (1, 1, 2))
    runner.ensure_cache(1, 40, (1, 1, 2))  # 40 x 8 B = 320 B a block: 512 B aligned
    assert mem.allocs[io_buffers:] == [2 * 256, 2 * 512] and mem.frees == [2 * 256]


AGX_ORIN = {"name": "Orin", "compute_capability": "8.7", "sm_count": 16, "memory_gb": 30}
ORIN_NANO = {"name": "Orin", "compute_capability": "8.7", "sm_count": 8, "memory_gb": 7}


def test_build_info_mismatches_are_refused():
    info = {"tensorrt": "10.3.0", "gpu": AGX_ORIN}
    entry = {
        "plan": "decoder.fp16.plan",
        "source_sha256": "abc",
        "source_onnx": "decoder.fp16.onnx",
    }
    check_build_info(info, entry, "abc", "10.3.0", dict(AGX_ORIN), "art", "decoder")
    rtx = {"name": "RTX", "compute_capability": "8.9", "sm_count": 76, "memory_gb": 16}
    for args, message in [
        (("abc", "10.7.0", AGX_ORIN), "TensorRT 10.3.0, this is 10.7.0"),
        (("abc", "10.3.0", rtx), "built on Orin sm_87 16 SMs 30 GB, this GPU is RTX sm_89"),
        (("zzz", "10.3.0", AGX_ORIN), "the export changed"),
    ]:
        with pytest.raises(EngineMismatchError, match=message) as exc:
            check_build_info(info, entry, *args, "art", "decoder")
        assert "fila build --artifacts art --stages decoder" in str(exc.value)


def test_a_plan_built_on_an_agx_orin_is_refused_on_an_orin_nano():
    """Both call themselves "Orin": compute capability, SM count and memory tell them apart."""
    info = {"tensorrt": "10.3.0", "gpu": AGX_ORIN}
    entry = {"plan": "vision.fp16.plan", "source_sha256": "abc", "source_onnx": "vision.fp16.onnx"}
    with pytest.raises(
        EngineMismatchError, match="16 SMs 30 GB, this GPU is Orin sm_87 8 SMs 7 GB"
    ):
        check_build_info(info, entry, "abc", "10.3.0", ORIN_NANO, "art", "vision")
    old = {"tensorrt": "10.3.0", "gpu": {"name": "Orin"}}  # a record from before: by name
    check_build_info(old, entry, "abc", "10.3.0", ORIN_NANO, "art", "vision")


class FailingEngine(DoublingEngine):
    def create_execution_context(self):
        ctx = super().create_execution_context()
        ctx.execute_async_v3 = lambda stream: False  # TensorRT's way of saying it failed
        return ctx


def test_a_failing_execute_is_a_fila_error_not_a_stale_buffer():
    mem = FakeMemory()
    engine = FailingEngine({"x": "float32"}, {"y": "float32"}, mem)
    runner = TrtRunner(engine, [Profile("all", {"x": ((1, 4), (2, 4), (8, 4))})], "vision", mem)
    with pytest.raises(FilaError, match="TensorRT execute_async_v3 failed in stage vision"):
        runner.infer({"x": np.ones((2, 4), np.float32)})


def test_fp16_engine_gets_an_fp16_kv_cache():
    mem = FakeMemory()
    runner = kv_runner(mem, cache="float16")
    io_buffers = len(mem.allocs)
    runner.ensure_cache(1, 16, (1, 1, 2))
    assert runner.row_bytes == 2 * 2  # a row of two fp16 values
    assert mem.allocs[io_buffers:] == [2 * 256]  # K/V blocks of 64 B, each 256-B aligned
    assert runner.dtypes["past.0.key"] == np.float16


def test_engine_tensors_numpy_cannot_hold_are_refused_by_name():
    from runtime.backends.tensorrt.runner import np_dtype

    assert np_dtype(SimpleNamespace(name="HALF"), "s", "x") == np.float16
    assert str(np_dtype(SimpleNamespace(name="BF16"), "s", "x")) == "bfloat16"
    with pytest.raises(FilaError, match="stage decoder: engine tensor w is INT4"):
        np_dtype(SimpleNamespace(name="INT4"), "decoder", "w")


def test_max_batch_sizes_the_decoder_profiles(tiny_artifacts):
    from runtime.manifest import Manifest
    from runtime.profiles import stage_profiles

    manifest = Manifest.load(tiny_artifacts)
    assert manifest.stage("decoder")["axes"]["batch"]["max"] == 1  # fila export's default
    for profile in stage_profiles(manifest, "decoder", max_batch=1):
        assert {s[0] for s in profile.shapes["inputs_embeds"]} == {1}
        assert {s[1] for s in profile.shapes["past.0.key"]} == {1}
    capped = stage_profiles(manifest, "decoder", max_batch=4)  # never past the export's own max
    assert {s[0] for s in capped[0].shapes["inputs_embeds"]} == {1}


def test_engine_loader_finds_the_plan_by_stage_and_variant(tiny_artifacts, tmp_path):
    """The loader is given (stage, variant), not an ONNX path it has to map back."""
    import json
    import shutil

    from runtime.backends.tensorrt.loader import EngineLoader, built_engines
    from runtime.manifest import Manifest

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    (art / "engines").mkdir()
    engines = {
        f"{stage}.{variant}": {
            "plan": f"{stage}.{variant}.plan",
            "stage": stage,
            "precision": variant,
        }
        for stage, variant in [("decoder", "fp16"), ("vision", "fp16"), ("decoder", "fp32")]
    }
    (art / "engines" / "build_info.json").write_text(json.dumps({"engines": engines}))
    manifest = Manifest.load(art)
    _, entry = EngineLoader(manifest, "decoder", "fp16").entry()
    assert entry["plan"] == "decoder.fp16.plan"
    assert EngineLoader(manifest, "decoder", "fp32").entry()[1]["plan"] == "decoder.fp32.plan"
    with pytest.raises(EngineMismatchError, match=r"no engine for stage embed \(fp16\)"):
        EngineLoader(manifest, "embed", "fp16").entry()
    assert built_engines(manifest) == {("decoder", "fp16"), ("vision", "fp16"), ("decoder", "fp32")}
