"""`fila calibrate`: INT8 Q/DQ vision variants, weight-only decoder variants, their manifest entries,
and the calibration data handling (tiny preset, a few synthetic documents: seconds on CPU)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from benchmarks.targets import column_files
from calibration.calibrate import calibrate
from calibration.dataset import (
    ActivationStore,
    CalibrationError,
    CalibrationWarning,
    collect_stage_data,
    split_images,
)
from calibration.documents import make_document, write_documents
from calibration.qdq import QUANT_OPS, check_trt_layout, qdq_parameters, quantized_nodes
from calibration.sensitivity import quantize_vision_stage
from runtime import onnx_io
from runtime.manifest import Manifest
from runtime.pipeline import FilaPipeline
from runtime.variants import precision_spec, stage_variant
from tests.conftest import run_fila

VISION = [
    "convnext",
    "vit.0",
    "cvfm.0",
    "vit.1",
    "cvfm.1",
    "vit.2",
    "cvfm.2",
    "vit.3",
    "cvfm.3",
    "projector",
    "vision",
]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    write_documents(folder, 7, seed=1)
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_artifacts, docs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal") / "art"
    shutil.copytree(tiny_artifacts, folder)
    from fila_export.demo import data

    questions = data.write_question_set(
        list(data.generate(5, 3, boundary_share=0.5)), tmp_path_factory.mktemp("questions")
    )
    report = calibrate(
        folder,
        docs,
        num_calib=4,
        num_eval=2,
        seed=0,
        llm="w8,w4",
        tokens=4,
        e2e_images=1,
        threads=1,
        questions=questions,
    )
    return folder, report


def test_report_scores_task_accuracy_of_every_variant_mix(calibrated):
    folder, report = calibrated
    configs = [r["config"] for r in report.answers]
    assert configs == ["fp32", *(r.config for r in report.end_to_end)]
    for row in report.answers:
        assert row["n"] == 3 and 0 <= row["correct"] <= 3 and row["n_boundary"] >= 1
    assert report.answers[0]["same_as_fp32"] == 3
    saved = json.loads((folder / "calibration_report.json").read_text())
    assert saved["answer_accuracy"] == report.answers
    assert "## Task accuracy (exact match)" in (folder / "calibration_report.md").read_text()


def stage_data(manifest, docs, stages, seed=0):
    split = split_images(docs, num_calib=3, num_eval=2, seed=seed)
    store = ActivationStore()
    collect_stage_data(manifest, split, store, stages, threads=1)
    return split, store


# --- data ----------------------------------------------------------------------------------------
def test_split_is_seeded_and_held_out_set_does_not_depend_on_num_calib(docs):
    a = split_images(docs, num_calib=3, num_eval=2, seed=5)
    b = split_images(docs, num_calib=3, num_eval=2, seed=5)
    c = split_images(docs, num_calib=4, num_eval=2, seed=5)
    d = split_images(docs, num_calib=3, num_eval=2, seed=6)
    assert [r.path for r in a.calibration] == [r.path for r in b.calibration]
    assert a.calibration_set_sha256 == b.calibration_set_sha256
    assert [r.path for r in a.held_out] == [r.path for r in c.held_out]
    assert not {r.path for r in a.held_out} & {r.path for r in a.calibration}
    assert len(c.calibration) == 4
    assert a.calibration_set_sha256 != d.calibration_set_sha256 or [r.path for r in a.held_out] != [
        r.path for r in d.held_out
    ]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        split_images(tmp_path / "nope", num_calib=4)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(CalibrationError, match="no images"):
        split_images(tmp_path / "empty", num_calib=4)


def test_unreadable_files_are_skipped_and_counted(tmp_path, docs):
    folder = tmp_path / "mixed"
    shutil.copytree(docs, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "nested").mkdir()
    (folder / "nested" / "empty.jpg").write_bytes(b"")
    with pytest.warns(CalibrationWarning, match="skipped 2 unreadable"):
        split = split_images(folder, num_calib=3, num_eval=2)
    assert len(split.skipped) == 2
    assert {p.split("/")[-1] for p, _ in split.skipped} == {"broken.png", "empty.jpg"}
    assert len(split.calibration) == 3 and len(split.held_out) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.webp").write_bytes(b"nope")
    with pytest.raises(CalibrationError, match="none of the 1 image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split_images(bad, num_calib=3)


def test_fewer_images_than_num_calib_warns_and_uses_what_exists(docs):
    with pytest.warns(CalibrationWarning, match="only 5 image"):
        split = split_images(docs, num_calib=50, num_eval=2)
    assert len(split.calibration) == 5 and split.requested == 50


def test_one_image_is_both_sets_with_a_warning(tmp_path):
    make_document(0, (400, 300)).save(tmp_path / "one.png")
    with pytest.warns(CalibrationWarning):
        split = split_images(tmp_path, num_calib=2, num_eval=2)
    assert len(split.calibration) == 1 and split.held_out == split.calibration


def test_prompts_jsonl(tmp_path, docs):
    folder = tmp_path / "p"
    shutil.copytree(docs, folder)
    (tmp_path / "prompts.jsonl").write_text(
        '{"prompt": "What is the total?", "image": "doc_000.png"}\n'
        '\n{"prompt": "Read the table."}\n'
    )
    with pytest.warns(CalibrationWarning, match="only 5"):
        split = split_images(folder, 10, 2, prompts=tmp_path / "prompts.jsonl")
    by_name = {r.path.name: r.prompt for r in [*split.calibration, *split.held_out]}
    assert by_name["doc_000.png"] == "What is the total?"
    assert {p for n, p in by_name.items() if n != "doc_000.png"} == {"Read the table."}
    (tmp_path / "bad.jsonl").write_text("just text\n")
    with pytest.raises(CalibrationError, match="line 1"):
        split_images(folder, 10, 2, prompts=tmp_path / "bad.jsonl")


def test_synthetic_documents_are_deterministic():
    a, b = make_document(3), make_document(3)
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(make_document(4, a.size)), np.asarray(a))
    assert np.asarray(a).std() > 10  # there is ink on the page


def test_stage_inputs_come_from_the_fp32_upstream_stages(tiny_artifacts, docs):
    manifest = Manifest.load(tiny_artifacts)
    split, store = stage_data(manifest, docs, ["vit.1", "projector", "vision"])
    with store:
        (i1, _), (_, o0) = store.get("calib", 0, "vit.1"), store.get("calib", 0, "projector")
        assert set(i1) == {"hidden"}
        # the fused graph and the modular chain agree on the projected features
        _, fused = store.get("calib", 0, "vision")
        assert np.allclose(fused["image_features"], o0["image_features"], atol=1e-4)
        assert store.counts == {"calib": 3, "eval": 2}


# --- quantization --------------------------------------------------------------------------------
def test_same_images_and_seed_give_identical_scales_and_zero_points(tiny_artifacts, docs, tmp_path):
    manifest = Manifest.load(tiny_artifacts)
    params = []
    for run in range(2):
        _, store = stage_data(manifest, docs, ["vit.0", "vision"])
        with store:
            for stage in ("vit.0", "vision"):
                out = tmp_path / f"{run}.{stage}.onnx"
                quantize_vision_stage(manifest.stage_path(stage), out, store, stage, threads=1)
        params.append(
            {
                s: qdq_parameters(onnx.load(tmp_path / f"{run}.{s}.onnx"))
                for s in ("vit.0", "vision")
            }
        )
    for stage in ("vit.0", "vision"):
        a, b = params[0][stage], params[1][stage]
        assert a and a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_zero_points_are_int8_zero_and_weight_scales_per_output_channel(calibrated):
    folder, _ = calibrated
    for stage in VISION:
        model = onnx.load(folder / f"{stage}.int8.onnx")
        inits = {i.name: i for i in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, stage
        for node in qdq:
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.INT8, (stage, node.name)
            assert not numpy_helper.to_array(zp).any(), (stage, node.name)
        consumers = {i: n for n in model.graph.node for i in n.input}
        for node in qdq:
            scale = numpy_helper.to_array(inits[node.input[1]])
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and scale.size > 1:
                axis = next(a.i for a in node.attribute if a.name == "axis")
                user = consumers[node.output[0]]
                weight = numpy_helper.to_array(inits[node.input[0]])
                assert axis == (0 if user.op_type == "Conv" else 1), (stage, node.name)
                assert scale.size == weight.shape[axis]
        assert check_trt_layout(model) == []


def test_only_conv_matmul_gemm_read_dequantized_activations(calibrated):
    """LayerNorm, Softmax, GELU, residual adds: all stay fp32."""
    folder, _ = calibrated
    for stage in VISION:
        model = onnx.load(folder / f"{stage}.int8.onnx")
        dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        for node in model.graph.node:
            if any(i in dq_out for i in node.input):
                assert node.op_type in QUANT_OPS, (stage, node.name, node.op_type)


def test_every_vision_stage_meets_the_gate_and_is_in_the_manifest(calibrated):
    folder, report = calibrated
    manifest = Manifest.load(folder)  # hashes verified
    rows = [(r.stage, r.precision) for r in report.stages]
    assert sorted(rows) == sorted((s, v) for s in VISION for v in ("int8", "int8-cpu"))
    assert rows[-len(CONV_STAGES) :] == [(s, "int8-cpu") for s in CONV_STAGES]  # cpu layout
    for stage in VISION:
        entry = manifest.variant(stage, "int8")
        assert entry["file"] == f"{stage}.int8.onnx"
        assert entry["precision"] == "int8" and entry["method"] == "minmax"
        assert entry["validated"] is True, stage
        assert entry["accuracy"]["cosine"] >= 0.99
        assert {"cosine", "sqnr_db", "rel_l2"} <= set(entry["accuracy"])
        assert entry["calibration_set_sha256"] == report.split["calibration_set_sha256"]
        assert isinstance(entry["excluded_layers"], list)
    assert manifest.variant("vision", "int8")["accuracy"]["cosine"] >= 0.99
    assert "int8" not in manifest.stage("embed")["variants"]
    assert (folder / "calibration_report.md").is_file()
    assert (folder / "calibration_report.json").is_file()


CONV_STAGES = ["convnext", "vit.0", "vision"]  # the stages with convolutions (vit.0: patches)


def optimized_ops(path, tmp_path) -> set[str]:
    """The op types ONNX Runtime's CPU provider runs after its graph optimizations."""
    out = tmp_path / f"{path.name}.optimized.onnx"
    onnx_io.session(path, threads=1, optimized_cache=out)
    return {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}


def test_tensorrt_int8_is_an_fp16_graph_and_onnxruntime_keeps_an_fp32_one(calibrated):
    """TensorRT builds ``int8`` strongly typed: what it leaves unquantized runs in the graph's
    types, so that graph computes in fp16 (norms and softmax in fp32, fp32 at its inputs and
    outputs, as the fp16 export's). ONNX Runtime's CPU provider gets ``int8-cpu``: the same
    Q/DQ in fp32 for stages without convolutions (int8 MatMuls), its own layout for the rest."""
    folder, _ = calibrated
    manifest = Manifest.load(folder)
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    for stage in VISION:
        model = onnx.load(str(manifest.stage_path(stage, "int8")), load_external_data=False)
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
        assert {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]} <= {
            f32,
            TensorProto.INT64,
        }, stage
        inits = {i.name: i for i in graph.initializer}
        scales = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"]
        assert scales and {t.data_type for t in scales} == {f16}, stage
        types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        quantized = [n for n in graph.node if n.op_type in QUANT_OPS]
        assert all(types.get(n.output[0]) == f16 for n in quantized), stage
        for node in (n for n in graph.node if n.op_type in onnx_io.NORM_OPS):
            assert types.get(node.output[0], f32) == f32, (stage, node.name)
        assert model.ir_version <= onnx_io.IR_VERSION  # JetPack 6's onnxruntime reads it
        cpu = manifest.variant(stage, "int8-cpu")
        assert cpu["backends"] == ["onnxruntime"] and cpu["validated"] is True, stage
        cpu_graph = onnx.load(str(manifest.stage_path(stage, "int8-cpu")), load_external_data=False)
        assert {i.data_type for i in cpu_graph.graph.initializer} <= {
            f32,
            TensorProto.INT8,
            TensorProto.UINT8,
            TensorProto.INT32,
            TensorProto.INT64,
        }, stage
    spec = precision_spec(manifest, "int8")
    for stage in VISION:
        assert stage_variant(manifest, spec, stage, "tensorrt") == "int8"
        assert stage_variant(manifest, spec, stage, "onnxruntime") == "int8-cpu"


def test_convolution_stages_get_onnxruntime_cpu_layout(calibrated, docs, tmp_path):
    """onnxruntime convolves the TensorRT layout in fp32 (dequantized weights); the int8-cpu
    layout (uint8 activations, Q/DQ on outputs, int32 bias) becomes QLinearConv, and the runtime
    picks it for int8 on onnxruntime, never on TensorRT."""
    folder, _ = calibrated
    manifest = Manifest.load(folder)
    for stage in CONV_STAGES:
        entry = manifest.variant(stage, "int8-cpu")
        assert entry["precision"] == "int8" and entry["backends"] == ["onnxruntime"]
        assert entry["validated"] is True and entry["accuracy"]["cosine"] >= 0.99, stage
        path = manifest.stage_path(stage, "int8-cpu")
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert quantize and all(
            inits[n.input[2]].data_type == TensorProto.UINT8 for n in quantize
        ), stage
        assert "QLinearConv" in optimized_ops(path, tmp_path), stage
        trt_layout = optimized_ops(manifest.stage_path(stage, "int8"), tmp_path)
        assert "QLinearConv" not in trt_layout and "Conv" in trt_layout, stage
    spec = precision_spec(manifest, "int8")
    assert stage_variant(manifest, spec, "convnext", "onnxruntime") == "int8-cpu"
    assert stage_variant(manifest, spec, "convnext", "tensorrt") == "int8"
    assert stage_variant(manifest, spec, "vit.1", "onnxruntime") == "int8-cpu"  # its fp32 Q/DQ
    assert "int8-cpu" not in manifest.variants_for("vision", "tensorrt")
    manifest.stage("convnext")["variants"]["int8-cpu"]["validated"] = False  # in memory only
    assert stage_variant(manifest, spec, "convnext", "onnxruntime") == "int8"  # the one that passed
    assert column_files(manifest, "onnxruntime", "int8")["vision"].name == "vision.int8-cpu.onnx"
    assert column_files(manifest, "tensorrt", "int8")["vision"].name == "vision.int8.onnx"
    pipe = FilaPipeline.from_artifacts(folder, precision="int8", threads=1)
    answer = pipe.generate(next(docs.iterdir()), "What is it?", max_new_tokens=2, ignore_eos=True)
    assert len(answer.token_ids) == 2


def matmul_weight_bytes(path) -> int:
    """Bytes of the weights (and their scales) the graph's MatMuls read."""
    model = onnx.load(str(path))
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in model.graph.initializer}
    return sum(
        sizes.get(name, 0)
        for node in model.graph.node
        if node.op_type in ("MatMul", "MatMulNBits")
        for name in node.input[1:]
    )


def test_w4_decoder_is_smaller_and_runs_through_the_pipeline(calibrated):
    folder, report = calibrated
    manifest = Manifest.load(folder)
    fp32, w4, w8 = (
        matmul_weight_bytes(manifest.stage_path("decoder_gqa", p)) for p in ("fp32", "w4", "w8")
    )
    assert w4 < w8 < fp32 and w4 * 4 < fp32  # the MatMul weights; tiny's rotary tables aside
    ops = {n.op_type for n in onnx.load(folder / "decoder_gqa.w4.onnx").graph.node}
    assert "MatMulNBits" in ops
    assert manifest.variant("decoder_gqa", "w4")["validated"] is True
    ref = FilaPipeline.from_artifacts(folder).generate(
        "fila_export/demo/examples/photos/page.png", "Hi", max_new_tokens=4
    )
    for spec in ("int8,w4", "vision=int8,decoder=w4", "w4"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = FilaPipeline.from_artifacts(folder, precision=spec)
        assert not [w for w in caught if "gate" in str(w.message)]  # every variant passed
        out = pipe.generate("fila_export/demo/examples/photos/page.png", "Hi", max_new_tokens=4)
        assert out.prompt_token_ids == ref.prompt_token_ids and len(out.token_ids) <= 4
    names = {
        n: r.session._model_path.rsplit("/", 1)[-1]
        for n, r in FilaPipeline.from_artifacts(
            folder, precision="vision=int8,decoder=w4", vision="modular"
        ).runners.items()
    }
    assert names["decoder_gqa"] == "decoder_gqa.w4.onnx" and names["vit.2"] == "vit.2.int8-cpu.onnx"
    assert names["embed"] == "embed.onnx"
    rows = {r.config: r for r in report.end_to_end}
    trt_row = "decoder=w4 (TensorRT Q/DQ graph, run on ONNX Runtime)"
    assert set(rows) >= {"decoder=w4", "vision=int8", "vision=int8,decoder=w4", trt_row}
    assert all(0 <= r.token_agreement <= 1 for r in rows.values())


def test_w4_for_tensorrt_is_int4_qdq_that_passes_check_trt(calibrated):
    """The portable decoder's w4: int4 blocks with positive scales behind DequantizeLinear."""
    from onnx import numpy_helper

    from fila_export.tensorrt.check import check_artifacts

    folder, report = calibrated
    manifest = Manifest.load(folder)
    entry = manifest.variant("decoder", "w4")
    assert entry["scheme"]["format"].startswith("QDQ") and entry["validated"] is True
    model = onnx.load(folder / entry["file"])
    assert "MatMulNBits" not in {n.op_type for n in model.graph.node}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert dq and {n.output[0] for n in dq} <= {n.input[1] for n in matmuls}
    inits = {t.name: t for t in model.graph.initializer}
    for node in dq:
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT4 and len(node.input) == 2
        assert (numpy_helper.to_array(inits[node.input[1]]) > 0).all()
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT16  # W4A16 from fp16
    assert [f.line() for f in check_artifacts(folder, "10.3", precisions=["w4"])] == []
    rows = {(r.stage, r.precision): r for r in report.decoder}
    assert rows[("decoder", "w4")].validated
    pipe = FilaPipeline.from_artifacts(folder, precision="w4", decoder="portable")
    assert pipe.runners["decoder"].session._model_path.endswith("decoder.w4.onnx")
    assert pipe.generate(
        "fila_export/demo/examples/photos/page.png", "Hi", max_new_tokens=4
    ).token_ids


def test_sensitivity_pass_keeps_the_worst_layers_in_fp32_until_the_gate_is_met(
    tiny_artifacts, docs, tmp_path
):
    manifest = Manifest.load(tiny_artifacts)
    _, store = stage_data(manifest, docs, ["vision"])
    with store:
        full = quantize_vision_stage(
            manifest.stage_path("vision"), tmp_path / "a.onnx", store, "vision", threads=1
        )
        gate = 1 - (1 - full.metrics.cosine) / 3  # needs some, not all, layers back in fp32
        res = quantize_vision_stage(
            manifest.stage_path("vision"),
            tmp_path / "b.onnx",
            store,
            "vision",
            gate_cosine=gate,
            max_excluded=40,
            threads=1,
        )
    assert res.validated and res.metrics.cosine >= gate > full.metrics.cosine
    assert 0 < len(res.excluded) <= 40
    assert [n for n, _ in res.sensitivity[: len(res.excluded)]] == res.excluded
    quantized = quantized_nodes(onnx.load(tmp_path / "b.onnx"))
    assert not quantized & set(res.excluded)
    assert len(quantized) == res.candidates - len(res.excluded)


def test_unreachable_gate_is_written_unvalidated_with_the_best_cosine(
    tiny_artifacts, docs, tmp_path
):
    folder = tmp_path / "art"
    shutil.copytree(tiny_artifacts, folder)
    proc = run_fila(
        "calibrate",
        "--artifacts",
        str(folder),
        "--images",
        str(docs),
        "--num-calib",
        "3",
        "--num-eval",
        "2",
        "--gate-cosine",
        "1.0",
        "--max-excluded",
        "2",
        "--stages",
        "vit.1",
        "--llm",
        "none",
        "--quiet",
        "--threads",
        "1",
    )
    assert proc.returncode == 1, proc.stderr
    assert "best cosine reached 0.99" in proc.stderr and "--max-excluded 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    entry = Manifest.load(folder).variant("vit.1", "int8")
    assert entry["validated"] is False and len(entry["excluded_layers"]) <= 2
    with pytest.warns(UserWarning, match="accuracy gate"):
        FilaPipeline.from_artifacts(folder, precision="int8", vision="modular")


def test_cli_errors_are_one_line(tmp_path, tiny_artifacts):
    proc = run_fila(
        "calibrate", "--artifacts", str(tiny_artifacts), "--images", str(tmp_path / "missing")
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.startswith("error: calibration image folder") and "Traceback" not in proc.stderr
    )
    proc = run_fila(
        "calibrate", "--artifacts", str(tiny_artifacts), "--images", str(tmp_path), "--llm", "w3"
    )
    assert proc.returncode == 1 and "--llm w3" in proc.stderr


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods(tiny_artifacts, docs, tmp_path, method):
    manifest = Manifest.load(tiny_artifacts)
    _, store = stage_data(manifest, docs, ["vit.0", "projector"])
    with store:
        for stage in ("vit.0", "projector"):
            res = quantize_vision_stage(
                manifest.stage_path(stage),
                tmp_path / f"{stage}.onnx",
                store,
                stage,
                method=method,
                threads=1,
            )
            assert res.validated and res.method == method
            assert check_trt_layout(onnx.load(tmp_path / f"{stage}.onnx")) == []


def test_graph_outputs_and_fp32_consumers_keep_float_tensors(tmp_path):
    """A tensor that is a graph output, feeds a quantized MatMul and an fp32 Add: the output and
    the Add get the float tensor, only the MatMul reads the dequantized copy."""
    from onnx import helper

    from calibration.qdq import load_named, quantize_qdq

    rng = np.random.default_rng(0)
    w1, w2 = (
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n)
        for n in ("w1", "w2")
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm1"),
            helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm2"),
            helper.make_node("Add", ["y", "x"], ["a"], name="add"),
        ],
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 8]) for n in "yza"],
        [w1, w2],
    )
    path = tmp_path / "toy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    store = ActivationStore()
    with store:
        for i in range(3):
            store.put("calib", i, "toy", {"x": rng.standard_normal((4, 8)).astype(np.float32)}, {})
        q = quantize_qdq(
            load_named(path),
            tmp_path / "toy.int8.onnx",
            store,
            "toy",
            "minmax",
            [],
            tmp_path / "ranges.json",
        )
    producer = {o: n for n in q.graph.node for o in n.output}
    assert producer["y"].name == "mm1" and {o.name for o in q.graph.output} == {"y", "z", "a"}
    add = next(n for n in q.graph.node if n.name == "add")
    assert list(add.input) == ["y", "x"]
    mm2 = next(n for n in q.graph.node if n.name == "mm2")
    assert producer[mm2.input[0]].op_type == "DequantizeLinear"
    assert quantized_nodes(q) == {"mm1", "mm2"}
    onnx.checker.check_model(q)


def test_embedding_variants_are_block_quantized_gathers_for_onnxruntime(calibrated):
    """``embed`` w8/w4: GatherBlockQuantized (ONNX Runtime only), chosen by the precision spec,
    with the table's accuracy recorded; TensorRT keeps the float embedding."""
    folder, report = calibrated
    manifest = Manifest.load(folder)
    for precision, bound in (("w8", 0.05), ("w4", 0.2)):
        entry = manifest.variant("embed", precision)
        assert entry["backends"] == ["onnxruntime"] and entry["validated"]
        assert 0 < entry["accuracy"]["rel_l2"] <= bound
        graph = onnx.load(folder / entry["file"])
        assert [n.op_type for n in graph.graph.node][0] == "GatherBlockQuantized"
    assert manifest.variants_for("embed", "tensorrt") == ["fp32", "fp16"]
    pipe = FilaPipeline.from_artifacts(folder, precision="w4")
    assert pipe.runners["embed"].session._model_path.endswith("embed.w4.onnx")
    ids = np.array([[5, 6, 7]], np.int64)
    base = FilaPipeline.from_artifacts(folder).embed(ids)
    rel = np.linalg.norm(pipe.embed(ids) - base) / np.linalg.norm(base)
    assert 0 < rel < 0.2
    rows = {(r.stage, r.precision) for r in report.decoder}
    assert {("embed", "w8"), ("embed", "w4")} <= rows


def test_llm_block_size_is_the_matmulnbits_block(tiny_artifacts, tmp_path):
    """``fila calibrate --llm-block-size``: weights per scale of every MatMulNBits."""
    from calibration.weight_only import quantize_decoder
    from runtime.manifest import Manifest

    source = Manifest.load(tiny_artifacts).stage_path("decoder_gqa")
    blocks = {}
    for size in (32, 64):
        quantize_decoder(source, tmp_path / f"d{size}.onnx", "w4", block_size=size)
        graph = onnx.load(tmp_path / f"d{size}.onnx").graph
        nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
        blocks[size] = {a.i for n in nodes for a in n.attribute if a.name == "block_size"}
    assert blocks == {32: {32}, 64: {64}}
