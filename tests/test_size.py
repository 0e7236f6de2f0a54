"""What makes 2-8 B models fit: checkpoints written tensor by tensor, weights read lazily by stage,
one weight file per precision that every graph shares, the parity executor chosen by memory, the
quantized embedding, and the memory planner's arithmetic (all on ``tiny``)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from conftest import run_fila

import fila_export.export.stage_export as stage_export
import fila_export.model.weights as weights_module
from fila_export.export.exporter import export_artifacts
from fila_export.model.checkpoint import init_checkpoint, load_checkpoint, open_model
from runtime.generate import DecoderShape
from runtime.manifest import Manifest, ManifestError
from runtime.onnx_io import graph_bytes
from runtime.pipeline import FilaPipeline
from runtime.plan import (
    MB,
    ORT_CPU_HELD,
    RUNTIME_BYTES,
    VISION_ARENA,
    plan_memory,
    vision_activations,
    with_target,
    with_weight_only_estimates,
)
from runtime.variants import PrecisionError, vision_mode


def external_refs(path) -> dict[str, tuple[str, int, int]]:
    """initializer -> (file, offset, length) of a graph's external weights."""
    out = {}
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        where = {e.key: e.value for e in init.external_data}
        if "location" in where:
            out[init.name] = (where["location"], int(where["offset"]), int(where["length"]))
    return out


def test_init_writes_shards_tensor_by_tensor_at_the_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "MAX_SHARD_BYTES", 150_000)
    folder = init_checkpoint("tiny", tmp_path / "ckpt", seed=0, dtype="fp16")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((folder / s).stat().st_size < 150_000 + 70_000 for s in shards)
    model, config, store = open_model(folder)
    assert {str(store.get(k).dtype) for k in store.keys()} == {"torch.float16"}
    assert next(model.parameters()).is_meta  # opening reads no tensor
    fp32 = init_checkpoint("tiny", tmp_path / "fp32", seed=0)
    a, _ = load_checkpoint(fp32)
    b, _ = load_checkpoint(folder)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert np.array_equal(x.half().numpy(), y.half().numpy()), name  # the same values


def test_a_stage_reads_only_its_own_weights(tiny_checkpoint, tmp_path, monkeypatch):
    read = []
    real = weights_module.WeightStore.get
    monkeypatch.setattr(
        weights_module.WeightStore,
        "get",
        lambda self, k, d=None: read.append(k) or real(self, k, d),
    )
    export_artifacts(tiny_checkpoint, tmp_path / "art", stages=["projector"], progress=False)
    assert read and set(read) <= {"image_newline"} | {
        k for k in read if k.startswith("multi_modal_projector.")
    }
    assert any(k.startswith("multi_modal_projector.") for k in read)


def test_graphs_share_one_weight_file_per_precision(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    portable = external_refs(manifest.stage_path("decoder"))
    gqa = external_refs(manifest.stage_path("decoder_gqa"))
    assert {f for f, _, _ in portable.values()} == {"weights.fp32.data"}
    # the GQA graph reads the same bytes as the portable one for every layer weight
    layer_weights = {ref for name, ref in gqa.items() if ".layers." in name}
    assert layer_weights and layer_weights <= set(portable.values())
    vision = set(external_refs(manifest.stage_path("vision")).values())
    modular = set().union(
        *(external_refs(manifest.stage_path(s)).values() for s in manifest.vision_chain)
    )
    assert vision == modular  # the fused graph reads the modular stages' weights
    entries = {json.dumps(manifest.variant(s)["external_data"]) for s in manifest.stages}
    assert len(entries) == 1  # one weight file, hashed once, for every fp32 graph


def test_large_fp16_stages_are_checked_on_the_reference_evaluator(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        stage_export, "parity_executor", lambda dtype, size, budget: "onnx-reference"
    )
    m = export_artifacts(
        tiny_checkpoint,
        tmp_path / "art",
        precisions=["fp16"],
        stages=["embed", "decoder_gqa"],
        progress=False,
    )
    parity = m.variant("decoder_gqa", "fp16")["parity"]
    assert parity["executor"] == "onnx-reference" and parity["rel_l2"] <= parity["tolerance"]
    assert m.base == "fp16" and m.variant("decoder_gqa")["precision"] == "fp16"


def test_the_parity_executor_follows_the_memory_bound():
    import torch

    big = 3 * 10**9
    assert stage_export.parity_executor(torch.float16, big, 1.5 * big + 1e9) == "onnx-reference"
    assert stage_export.parity_executor(torch.float16, 10**8, 1.5 * big + 1e9) == "onnxruntime"
    assert stage_export.parity_executor(torch.float32, big, 1.0) == "onnxruntime"


def test_plan_arithmetic_on_tiny(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    plan = plan_memory(manifest, context=100)
    terms = {t.name.split(" (")[0]: t.bytes for t in plan.terms}
    shape = DecoderShape.from_text_config(manifest.model["text"])
    assert terms["KV cache"] == 2 * shape.num_layers * shape.kv_heads * shape.head_dim * 4 * 100
    assert terms["runtime"] == RUNTIME_BYTES
    for stage in ("vision", "embed", "decoder_gqa"):
        assert terms[f"weights: {stage}"] > 0
    phases = terms.pop("vision activations"), terms.pop("prefill activations")
    assert plan.total == pytest.approx(sum(terms.values()) + max(phases))  # one phase at a time
    fp16 = {t.name: t.bytes for t in plan_memory(manifest, precision="fp16", context=100).terms}
    assert fp16["weights: vision (fp16)"] == 0  # on the CPU provider: opened per image
    largest = max(graph_bytes(manifest.stage_path(s, "fp16")) for s in manifest.vision_chain)
    formula = vision_activations(manifest, None, backend="tensorrt").bytes  # no CPU factor
    activations = VISION_ARENA["fp16"] * formula
    assert fp16["vision activations"] == pytest.approx(activations + largest)
    assert terms["weights: vision"] == pytest.approx(
        ORT_CPU_HELD["vision", "fp32"] * graph_bytes(manifest.stage_path("vision", "fp32"))
    )
    fits = with_target(plan_memory(manifest, context=100), board="orin-nano-8gb")
    assert fits.fits and fits.available == pytest.approx((7.6 - 2.8) * 1e9)
    tight = with_target(plan_memory(manifest, context=100), memory_gb=plan.total / 1e9 / 2)
    assert tight.fits is False and tight.total / MB > 0


def test_plan_estimates_weight_only_variants_before_they_are_made(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    assert "w4" not in manifest.variants_for("decoder_gqa")
    with pytest.raises(PrecisionError, match="w4"):
        plan_memory(manifest, precision="w4")
    before = copy.deepcopy(manifest.data)
    estimated = with_weight_only_estimates(manifest, ["w4", "w8"])
    assert manifest.data == before  # the export's own manifest is left as it was
    terms = {t.name: t for t in plan_memory(estimated, precision="w4").terms}
    decoder = terms["weights: decoder_gqa (w4)"]
    fp32_bytes = graph_bytes(manifest.stage_path("decoder_gqa"))
    held = ORT_CPU_HELD["decoder", "w4"]  # 4-bit weights, an fp32 scale per 32 (fp32 graph)
    assert decoder.bytes == pytest.approx(fp32_bytes * (4 + 32 / 32) / 32 * held)
    assert "estimated" in decoder.note and "weights: embed (w4)" in terms
    on_trt = {t.name for t in plan_memory(estimated, precision="w4", backend="tensorrt").terms}
    assert {"weights: decoder (w4)", "weights: embed (fp32)"} <= on_trt  # the gather is ORT's
    assert "w8" not in estimated.variants_for("decoder")  # calibrate makes the portable w4 only
    with pytest.raises(ManifestError, match="estimate"):
        estimated.stage_path("decoder_gqa", "w4")  # nothing can open an estimate
    with pytest.raises(ManifestError, match="estimates"):
        estimated.save()


def test_fila_plan_estimate_plans_what_calibrate_would_make(tiny_artifacts):
    refused = run_fila("plan", "--artifacts", str(tiny_artifacts), "--precision", "w4")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "w4" in refused.stderr
    r = run_fila("plan", "--artifacts", str(tiny_artifacts), "--precision", "w4", "--estimate")
    assert r.returncode == 0, r.stderr
    assert "decoder_gqa.onnx at w4, estimated" in r.stdout


def test_a_per_run_runner_opens_per_call_and_refuses_io_binding(tiny_artifacts):
    from runtime.backends.onnxruntime import OrtRunner, SessionLoader
    from runtime.onnx_io import BackendError

    loader = SessionLoader(Manifest.load(tiny_artifacts).stage_path("embed"))
    runner = OrtRunner(loader, "embed", per_run=True)
    ids = {"input_ids": np.array([[1, 2]], np.int64)}
    assert runner.session is None and runner.infer(ids)["inputs_embeds"].shape[:2] == (1, 2)
    with pytest.raises(BackendError, match="per run"):
        runner.bind_fixed({}, {})
    with pytest.raises(BackendError, match="needs a loader"):
        OrtRunner(loader(), "embed", per_run=True)
    runner.close()
    with pytest.raises(BackendError, match="closed"):
        runner.infer(ids)


def test_vision_mode_walks_the_chain_only_for_fp16_on_the_cpu_provider(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    assert vision_mode(manifest, "onnxruntime", "fp16") == "modular"
    assert vision_mode(manifest, "onnxruntime", None) == "fused"  # fp32
    assert vision_mode(manifest, "onnxruntime", "fp16", ["cuda", "cpu"]) == "fused"
    assert vision_mode(manifest, "tensorrt", "fp16") == "fused"
    assert vision_mode(manifest, "onnxruntime", "vision=fp16,vit.1=fp32") == "fused"  # mixed


def test_fp16_vision_on_the_cpu_walks_the_chain_with_sessions_opened_per_image(tiny_artifacts):
    """fp16 vision on ONNX Runtime's CPU provider holds no weights between images (each stage
    opened for its run, at the ``extended`` level) and gives the fused graph's features."""
    manifest = Manifest.load(tiny_artifacts)
    pipe = FilaPipeline.from_artifacts(tiny_artifacts, precision="fp16")
    assert "vision" not in pipe.runners
    first = pipe.runners[manifest.vision_chain[0]]
    assert first.session is None and first.loader.level == "extended"
    opened = []
    loader = first.loader
    first.loader = lambda: opened.append(1) or loader()
    image = pipe.preprocess(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8))
    features = pipe.run_vision(image)
    assert opened == [1] and first.session is None
    fused = FilaPipeline.from_artifacts(tiny_artifacts, precision="fp16", vision="fused")
    expected = fused.run_vision(image)
    rel = np.linalg.norm(features - expected) / np.linalg.norm(expected)
    assert rel < 5e-3  # fp16 kernels fused differently: 6.2e-4 measured on edge
    assert "vision" in FilaPipeline.from_artifacts(tiny_artifacts).runners  # fp32: fused, held
    assert fused.runners["decoder_gqa"].session is not None  # per-token graphs stay open


def test_a_pipeline_reports_its_peak_memory(tiny_artifacts):
    pipe = FilaPipeline.from_artifacts(tiny_artifacts)
    out = pipe.generate(np.zeros((60, 90, 3), np.uint8), "Hi", max_new_tokens=3)
    assert out.peak_rss_mb > 50 and out.to_dict()["peak_rss_mb"] == round(out.peak_rss_mb, 1)


def test_graphs_over_the_mapped_threshold_keep_weights_outside_and_the_caller_keeps_its_proto(
    tmp_path, monkeypatch
):
    """Weight-heavy graphs are written with external data (ONNX Runtime memory-maps it); the
    proto handed to ``save`` still holds its weights afterwards (calibration reads it on)."""
    from onnx import helper, numpy_helper

    from runtime import onnx_io

    weight = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph)
    assert onnx_io.save(model, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    monkeypatch.setattr(onnx_io, "MAPPED_WEIGHTS_ABOVE", 0)
    files = onnx_io.save(model, tmp_path / "big.onnx")
    assert files == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert external_refs(tmp_path / "big.onnx")["w"][0] == "big.onnx.data"
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), weight)
    x = np.ones((1, 64), np.float32)
    got = onnx_io.session(tmp_path / "big.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weight, rtol=1e-6)


def test_contexts_past_the_model_and_length_dependent_rope_are_refused():
    from fila_export.export.stages import gqa_unsupported_reason, stage_specs
    from fila_export.model.config import preset
    from runtime.errors import ConfigError

    config = preset("tiny")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        stage_specs(config, max_context=config.max_position_embeddings + 1)
    text = dict(config.text, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic" in gqa_unsupported_reason(text)
    assert gqa_unsupported_reason(config.text) is None
