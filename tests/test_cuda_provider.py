"""ONNX Runtime's CUDA provider: the decoder's KV cache is bound as device memory (as
onnxruntime-genai keeps it), and nodes that fall back to the CPU provider are named at load.

No CUDA here: the binding test runs the real CPU session behind a session that reports CUDA as
its first provider, with the cache in host memory labelled as device memory, and records what
device every binding asks for. It proves the bindings and the cache's device offsets (the tokens
equal a plain CPU run's); the ``gpu`` test is the proof on a GPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import random_image

import runtime.kv_cache as kv_cache
from runtime.backends.onnxruntime import OrtRunner, SessionLoader, placement
from runtime.kv_cache import DeviceArray

pytestmark = pytest.mark.board


class Binding:
    """The real IO binding, recording the device each tensor was bound on (bound on the host)."""

    def __init__(self, real, log: dict) -> None:
        self.real, self.log = real, log

    def bind_input(self, name, device, device_id, dtype, shape, ptr):
        self.log[name] = device
        self.real.bind_input(name, "cpu", 0, dtype, shape, ptr)

    def bind_output(self, name, device, device_id, dtype, shape, ptr):
        self.log[name] = device
        self.real.bind_output(name, "cpu", 0, dtype, shape, ptr)


class ReportsCuda:
    """A CPU session that says CUDA is its first provider."""

    def __init__(self, real, log: dict) -> None:
        self.real, self.log = real, log

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        return Binding(self.real.io_binding(), self.log)

    def run_with_iobinding(self, binding, options=None):
        self.real.run_with_iobinding(binding.real, options)

    def __getattr__(self, name):
        return getattr(self.real, name)


def host_as_device(shape, dtype, device="cpu"):
    """``kv_cache.allocate`` with "device" memory that is host memory (zeros)."""
    array = np.zeros(shape, dtype)
    if device == "cpu":
        return array
    return DeviceArray(array.ctypes.data, tuple(shape), np.dtype(dtype), device, array)


@pytest.mark.parametrize("decoder", ["gqa", "portable"])
def test_under_cuda_the_kv_cache_is_bound_on_the_device(tiny_artifacts, monkeypatch, decoder):
    from runtime.pipeline import FilaPipeline

    image = random_image(120, 200)
    with FilaPipeline.from_artifacts(tiny_artifacts, decoder=decoder) as pipe:
        stage = pipe.decoder_stage
        cpu_runner = pipe.runners[stage]
        want = pipe.generate(image, "Hi", max_new_tokens=8, ignore_eos=True).token_ids
        assert cpu_runner.cache_device == "cpu"
        log: dict[str, str] = {}
        real = SessionLoader(pipe.manifest.stage_path(stage))()
        pipe.runners[stage] = OrtRunner(ReportsCuda(real, log), stage)
        assert pipe.runners[stage].cache_device == "cuda"
        monkeypatch.setattr(kv_cache, "allocate", host_as_device)
        got = pipe.generate(image, "Hi", max_new_tokens=8, ignore_eos=True).token_ids
    assert got == want
    cache = {n: d for n, d in log.items() if n.startswith(("past.", "present."))}
    assert cache and set(cache.values()) == {"cuda"}
    assert {d for n, d in log.items() if n not in cache} == {"cpu"}  # embeddings, logits


def test_a_device_view_is_the_numpy_view_it_stands_for():
    host = np.arange(2 * 2 * 5 * 3, dtype=np.float32).reshape(2, 2, 5, 3)
    device = DeviceArray(host.ctypes.data, host.shape, host.dtype, "cuda", host)
    for key in [(1, 0, slice(1, 4)), (0, 1), (1, 1, slice(None)), (1,)]:
        view = device[key]
        want = host[key]
        assert view.shape == want.shape and view.ptr == want.ctypes.data, key
    with pytest.raises(IndexError):
        device[0, slice(0, 1), 0]


def test_compute_nodes_left_on_the_cpu_are_named_at_load(tiny_artifacts):
    """A device provider that takes no node (ONNX Runtime's Azure provider, in every build)
    leaves the decoder's MatMuls and attention on the CPU provider: each is named."""
    from runtime import onnx_io

    path = tiny_artifacts / "decoder_gqa.onnx"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        onnx_io.session(path, providers=["azure", "cpu"])
        onnx_io.session(path, providers=["cpu"])
    found = [w for w in seen if issubclass(w.category, placement.FallbackWarning)]
    assert len(found) == 1, [str(w.message) for w in seen]
    text = str(found[0].message)
    assert "decoder_gqa.onnx" in text and "although Azure was asked first" in text
    assert "GroupQueryAttention (" in text and "MatMul (" in text


# ONNX Runtime 1.23's verbose log of a session split between CUDA and the CPU, in the format of
# its session_state.cc (VerifyEachNodeIsAssignedToAnEp); written down here as a fact
MIXED_LOG = """\
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1299 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 2
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1301 VerifyEachNodeIsAssignedToAnEp]   MatMul (node_linear)
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1301 VerifyEachNodeIsAssignedToAnEp]   Add (node_add)
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1299 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1301 VerifyEachNodeIsAssignedToAnEp]   GroupQueryAttention (layers.0/attn)
2026-12-08 00:24:50.1 [V:onnxruntime:, session_state.cc:1301 VerifyEachNodeIsAssignedToAnEp]   Shape (node_shape)
2026-12-08 00:24:50.2 [V:onnxruntime:, inference_session.cc:2000 Initialize]  Session initialized
"""


def test_the_verbose_log_of_older_onnxruntime_is_read_for_placements():
    nodes = placement.cpu_nodes_from_log(MIXED_LOG, lambda: pytest.fail("not all on one EP"))
    assert nodes == [("GroupQueryAttention", "layers.0/attn"), ("Shape", "node_shape")]
    every = [("MatMul", "a"), ("Relu", "b")]
    all_cpu = "x [V:onnxruntime:, s.cc:1 V]  All nodes placed on [CPUExecutionProvider]. Number of nodes: 2"
    assert placement.cpu_nodes_from_log(all_cpu, lambda: every) == every
    all_cuda = all_cpu.replace("CPUExecutionProvider", "CUDAExecutionProvider")
    assert placement.cpu_nodes_from_log(all_cuda, lambda: every) == []


@pytest.mark.gpu
def test_tokens_on_the_cuda_provider_equal_the_cpu_providers(tiny_artifacts):
    """On a GPU with onnxruntime-gpu: the device-bound cache gives the CPU provider's tokens."""
    import onnxruntime as ort

    from runtime.pipeline import FilaPipeline

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    image = random_image(120, 200)
    runs = {}
    for providers in (["cpu"], ["cuda", "cpu"]):
        for decoder in ("gqa", "portable"):
            with FilaPipeline.from_artifacts(
                tiny_artifacts, precision="fp16", providers=providers, decoder=decoder
            ) as pipe:
                assert pipe.runners[pipe.decoder_stage].cache_device == providers[0]
                out = pipe.generate(image, "Hi", max_new_tokens=12, ignore_eos=True)
                runs[(providers[0], decoder)] = out.token_ids
    assert runs[("cuda", "gqa")] == runs[("cpu", "gqa")]
    assert runs[("cuda", "portable")] == runs[("cpu", "portable")]
