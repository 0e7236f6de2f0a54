"""The TensorRT path users run on a board, run here through the stand-ins (``tests/standins``):
``fila build``, the runners, validation against a recorded reference, ``fila run``, ``fila
bench`` and ``fila serve`` with ``--backend tensorrt``. This proves the runner's and build's use
of TensorRT's API, the KV cache's offsets and the buffers' lifetimes; never TensorRT's numerics or
speed (the stand-in runs the plan's ONNX graph on ONNX Runtime's CPU provider)."""

from __future__ import annotations

import gc
import json
import os
import sys

import numpy as np
import pytest
from conftest import ROOT, copy_export, random_image, run_fila
from standins import cudart_standin, trt_types

from runtime.errors import EngineMismatchError, FilaError

pytestmark = pytest.mark.board
PHOTO = str(ROOT / "fila_export" / "demo" / "examples" / "photos" / "chelsea.jpg")
SITE = ROOT / "tests" / "standins" / "site"


@pytest.fixture(scope="module")
def standin():
    """``import tensorrt`` and cuda-python's runtime give the stand-ins in this process."""
    import standins

    modules: dict = {}
    standins.install(modules)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in modules.items():
            mp.setitem(sys.modules, name, module)
        yield
    cudart_standin.reset()


def standin_env() -> dict:
    """The environment of a ``fila`` subprocess that runs TensorRT through the stand-ins."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)])}


@pytest.fixture(scope="module")
def tiny_engines(standin, tiny_recorded, tmp_path_factory):
    """fp16 engines of the tiny export (its fp16 KV rows are 64 B: positions are unaligned)."""
    from fila_export.tensorrt.build import build_engines

    art = copy_export(tiny_recorded, tmp_path_factory.mktemp("trt") / "tiny")
    build_engines(art, "fp16", progress=False)
    return art


def generate_tokens(pipe, n: int = 3) -> list[list[int]]:
    image = random_image(120, 200)
    return [
        pipe.generate(image, "Hi", max_new_tokens=12, ignore_eos=True).token_ids for _ in range(n)
    ]


def test_three_generates_match_onnxruntime_and_close_frees_every_byte(tiny_engines):
    """The device KV cache (prefill in place, decode through aligned scratch slots) gives the
    tokens ONNX Runtime's host cache gives on the same graphs; three requests allocate the cache
    once; close() leaves no device memory and no stream behind."""
    from runtime.pipeline import FilaPipeline

    with FilaPipeline.from_artifacts(
        tiny_engines, backend="onnxruntime", precision="fp16", decoder="portable"
    ) as ort_pipe:
        want = generate_tokens(ort_pipe)
    before = cudart_standin.live_bytes()
    trt_types.VIOLATIONS.clear()
    pipe = FilaPipeline.from_artifacts(tiny_engines, backend="tensorrt", precision="fp16")
    decoder = pipe.runners["decoder"]
    got = generate_tokens(pipe)
    assert got == want
    assert decoder.row_bytes == 64 and decoder.scratch_ptr is not None  # unaligned positions
    assert cudart_standin.live_bytes() > before
    pipe.close()
    assert decoder.engine is None and decoder.context is None and decoder.cache_ptr is None
    assert cudart_standin.live_bytes() == before == 0
    assert cudart_standin.live_allocations() == 0 and cudart_standin.live_streams() == 0
    gc.collect()
    assert trt_types.VIOLATIONS == []  # each engine went before the runtime that made it


def test_validate_reference_on_tensorrt_checks_the_decoder(tiny_engines):
    """The decoder stage is run as its contract has it (past in, present out): it used to fail
    with KeyError 'past.0.key' on TensorRT."""
    from runtime.reference import check_reference

    report = check_reference(tiny_engines, backend="tensorrt", precision="fp16")
    checked = {s.stage for s in report.stages}
    assert {"vision", "embed", "decoder"} <= checked, report.markdown()
    assert report.passed, report.markdown()
    assert report.tokens_compared > 0
    assert cudart_standin.live_bytes() == 0


def test_a_runner_that_fails_while_it_loads_frees_what_it_took(tiny_engines):
    """Each of the decoder runner's allocations failing in turn (its I/O buffers, then the
    cache and scratch of a first step): nothing allocated before the failure is left."""
    from runtime.backends import load_runner
    from runtime.generate import Decoder
    from runtime.manifest import Manifest
    from runtime.pipeline import FilaPipeline

    manifest = Manifest.load(tiny_engines)
    shape = FilaPipeline.from_artifacts(tiny_engines, vision="none").decoder_shape
    steps = 0
    for allowed in range(64):
        cudart_standin.fail_after(allowed)
        try:
            with load_runner("tensorrt", manifest, "decoder", "fp16") as runner:
                decoder = Decoder(runner, shape, batch=1, max_len=8)
                decoder.prefill(np.zeros((1, 3, 64), np.float32), np.ones((1, 3), np.int64))
                decoder.decode_one_token(np.zeros((1, 1, 64), np.float32))
            break  # every allocation succeeded
        except FilaError as exc:
            assert "cudaErrorMemoryAllocation" in str(exc)
            steps += 1
        finally:
            cudart_standin.fail_after(None)
        assert cudart_standin.live_bytes() == 0 and cudart_standin.live_streams() == 0, allowed
    assert steps >= 4  # buffers, cache and scratch each failed once


def test_a_pipeline_whose_later_stage_fails_closes_the_stages_it_loaded(tiny_engines, tmp_path):
    from runtime.pipeline import FilaPipeline

    art = copy_export(tiny_engines, tmp_path / "art")
    (art / "engines").mkdir()
    info = json.loads((tiny_engines / "engines" / "build_info.json").read_text())
    del info["engines"]["vision.fp16"]
    for plan in (tiny_engines / "engines").glob("*.plan"):
        (art / "engines" / plan.name).write_bytes(plan.read_bytes())
    (art / "engines" / "build_info.json").write_text(json.dumps(info))
    with pytest.raises(EngineMismatchError, match=r"no engine for stage vision \(fp16\)"):
        FilaPipeline.from_artifacts(art, backend="tensorrt", precision="fp16")
    assert cudart_standin.live_bytes() == 0 and cudart_standin.live_streams() == 0


def test_a_pipeline_whose_inference_raises_is_closed_on_the_way_out(tiny_engines, monkeypatch):
    from runtime.backends.tensorrt import TrtDecoderRunner
    from runtime.pipeline import FilaPipeline

    def broken(self):
        raise FilaError("TensorRT execute_async_v3 failed in stage decoder")

    monkeypatch.setattr(TrtDecoderRunner, "execute", broken)
    with pytest.raises(FilaError, match="execute_async_v3 failed"):
        with FilaPipeline.from_artifacts(
            tiny_engines, backend="tensorrt", precision="fp16"
        ) as pipe:
            pipe.generate(random_image(120, 200), "Hi", max_new_tokens=4)
    assert cudart_standin.live_bytes() == 0 and cudart_standin.live_streams() == 0


def test_a_plan_that_is_not_the_one_recorded_is_refused(tiny_engines, tmp_path):
    from runtime.backends import load_runner
    from runtime.manifest import Manifest

    art = copy_export(tiny_engines, tmp_path / "art")
    (art / "engines").mkdir()
    for f in (tiny_engines / "engines").iterdir():
        (art / "engines" / f.name).write_bytes(f.read_bytes())
    embed, vision = art / "engines" / "embed.fp16.plan", art / "engines" / "vision.fp16.plan"
    embed.write_bytes(vision.read_bytes())  # another build's plan under this name
    with pytest.raises(EngineMismatchError, match="not the plan fila build recorded"):
        load_runner("tensorrt", Manifest.load(art), "embed", "fp16")
    info_path = art / "engines" / "build_info.json"
    info = json.loads(info_path.read_text())
    info["engines"]["vision.fp16"]["tensorrt"] = "10.3.0.30"  # that plan's own build
    info_path.write_text(json.dumps(info))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0.30"):
        load_runner("tensorrt", Manifest.load(art), "vision", "fp16")


def test_build_keeps_the_entries_of_other_precisions(standin, tiny_artifacts, tmp_path):
    from fila_export.tensorrt.build import build_engines, record_engines

    art = copy_export(tiny_artifacts, tmp_path / "art")
    build_engines(art, "fp16", stages=["embed"], progress=False)
    build_engines(art, "fp32", stages=["embed"], progress=False)
    record_engines(art, "fp32", stages=["embed"])
    info = json.loads((art / "engines" / "build_info.json").read_text())
    assert set(info["engines"]) == {"embed.fp16", "embed.fp32"}
    for entry in info["engines"].values():  # each plan says what it was built with
        assert entry["tensorrt"].endswith("+standin") and entry["gpu"]["compute_capability"]
    assert info["engines"]["embed.fp16"]["strongly_typed"] is True
    assert info["engines"]["embed.fp32"]["built"].startswith("recorded")


def test_an_entry_from_before_per_plan_records_keeps_what_built_it(
    standin, tiny_artifacts, tmp_path
):
    """build_info.json written before entries said what built them: a later build rewrites the
    top level, but the old entry keeps the top level it had (not the new machine's)."""
    from fila_export.tensorrt.build import build_engines
    from runtime.backends import load_runner
    from runtime.manifest import Manifest

    art = copy_export(tiny_artifacts, tmp_path / "art")
    info_path = build_engines(art, "fp16", stages=["embed"], progress=False)
    info = json.loads(info_path.read_text())
    for key in ("tensorrt", "gpu", "jetson_l4t", "built"):
        info["engines"]["embed.fp16"].pop(key)
    info["tensorrt"] = "10.3.0.30"  # the old format: one record for every plan
    info_path.write_text(json.dumps(info))
    build_engines(art, "fp32", stages=["embed"], progress=False)
    assert json.loads(info_path.read_text())["engines"]["embed.fp16"]["tensorrt"] == "10.3.0.30"
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0.30"):
        load_runner("tensorrt", Manifest.load(art), "embed", "fp16")


def test_tensorrt_8_6_builds_q_dq_graphs_with_the_int8_flag(standin, tiny_artifacts, tmp_path):
    """JetPack 6.0's TensorRT 8.6 has no strong typing: an explicitly quantized graph needs
    BuilderFlag.INT8 (the stand-in refuses it without, as TensorRT does)."""
    import trt_qdq

    from fila_export.tensorrt.build import BuildOptions, build_stage
    from runtime.manifest import Manifest

    art = copy_export(tiny_artifacts, tmp_path / "art")
    trt_qdq.add_qdq_variant(art, "projector")
    import tensorrt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensorrt, "__version__", "8.6.2.3")
        (art / "engines").mkdir()
        entry = build_stage(
            Manifest.load(art), "projector", "int8", art / "engines", BuildOptions()
        )
    assert entry["strongly_typed"] is False and entry["builder_flags"] == ["FP16", "INT8"]


# --- the CLI, as a user runs it on a board: a subprocess with the stand-ins installed -----------
@pytest.fixture(scope="module")
def demo_engines(demo_recorded, tmp_path_factory):
    art = copy_export(demo_recorded, tmp_path_factory.mktemp("trt") / "demo")
    r = run_fila("build", "--artifacts", str(art), "--precision", "fp32", env=standin_env())
    assert r.returncode == 0, r.stderr
    return art


def test_fila_validate_reference_on_tensorrt(demo_engines, tmp_path):
    out = tmp_path / "report.json"
    args = ["--artifacts", str(demo_engines), "--backend", "tensorrt", "--precision", "fp32"]
    r = run_fila("validate", "--reference", *args, "--json", str(out), env=standin_env())
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert {"vision", "embed", "decoder"} <= {s["stage"] for s in report["stages"]}
    assert report["tokens_compared"] > 0 and report["first_divergence"] is None


@pytest.mark.skipif(
    not __import__("conftest").has_torch(), reason="validate vs PyTorch needs torch"
)
def test_fila_validate_against_pytorch_on_tensorrt(demo_engines):
    from fila_export.demo import CHECKPOINT

    args = ["--artifacts", str(demo_engines), "--checkpoint", str(CHECKPOINT), "--max-images", "1"]
    r = run_fila("validate", *args, "--backend", "tensorrt", "--tokens", "8", env=standin_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| decoder | fp32 |" in r.stdout and "**PASS**" in r.stdout


def test_fila_run_on_tensorrt(demo_engines):
    args = ["--artifacts", str(demo_engines), "--backend", "tensorrt", "--image", PHOTO]
    r = run_fila("run", *args, "--prompt", "What is it?", "--json", "--quiet", env=standin_env())
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["backend"] == "tensorrt" and result["token_ids"]


def test_fila_bench_on_tensorrt_times_what_was_built(demo_engines, tmp_path):
    """The default build makes the fused vision graph: the bench no longer asks for the modular
    chain's engines ("no engine for stage convnext")."""
    out = tmp_path / "bench"
    args = ["--artifacts", str(demo_engines), "--backends", "tensorrt", "--precisions", "fp32"]
    args += ["--contexts", "16", "--warmup", "0", "--runs", "1", "--decode-steps", "2"]
    args += ["--answer-tokens", "2", "--rounds", "1", "--out", str(out)]
    r = run_fila("bench", *args, env=standin_env())
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert result["backend"] == "tensorrt" and "vision" in result["stages"]
    assert "convnext" not in result["stages"]


def test_fila_serve_on_tensorrt_answers_a_request(demo_engines):
    from conftest import serving

    httpx = pytest.importorskip("httpx")
    cmd = ["--artifacts", str(demo_engines), "--backend", "tensorrt", "--model-name", "demo"]
    with serving(cmd, standin_env()) as url:
        body = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
