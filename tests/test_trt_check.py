"""`fila check-trt`: the tiny export passes; each planted TensorRT problem is found and names its node."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fila_export.cli import main
from fila_export.export.stage_export import OPSET
from fila_export.tensorrt.check import (
    TrtCheckError,
    check_artifacts,
    check_model,
    known_versions,
    load_table,
)
from runtime.errors import ManifestError
from runtime.manifest import sha256_file

F32, F16, F64, I8, U8, I64 = (
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT64,
)


def model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def only(findings, rule, node):
    hits = [f for f in findings if f.rule == rule and f.node == node]
    assert hits, f"no [{rule}] finding for {node!r}; got {[f.line() for f in findings]}"
    return hits[0]


def relu_model(**kw):
    return model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [vi("x", F32, ["batch", 8])],
        [vi("y", F32, ["batch", 8])],
        **kw,
    )


# --- the real export -----------------------------------------------------------------------------
def test_tiny_export_builds_with_tensorrt(tiny_artifacts, capsys):
    for version in ("10.3", "10.x"):
        report = check_artifacts(tiny_artifacts, version)
        assert [f.line() for f in report] == []
        precisions = {p for _, p in report.graphs}
        assert precisions == {"fp32", "fp16"} and len(report.graphs) >= 20
    assert main(["check-trt", "--artifacts", str(tiny_artifacts)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "not checked (ONNX Runtime only): decoder_gqa"
    assert len(out) == 2 and out[1].startswith("OK: ") and "TensorRT 10.3" in out[1]
    assert main(["check-trt", "--artifacts", str(tiny_artifacts), "--precision", "fp16"]) == 0
    assert "(fp16)" in capsys.readouterr().out


def test_tables_are_data_with_a_source():
    assert {"10.3", "10.x"} <= set(known_versions())
    for version in known_versions():
        table = load_table(version)
        assert "onnx-tensorrt" in table["source"] and "operators.md" in table["source"]
        assert table["opset"]["min"] <= OPSET <= table["opset"]["max"]  # what fila export writes
        assert {"Conv", "MatMul", "LayerNormalization", "Softmax"} <= set(table["operators"])
    assert load_table("10.3.0.30")["tensorrt"] == "10.3"
    assert "Attention" not in load_table("10.3")["operators"]  # added in 10.14
    assert "Attention" in load_table("10.x")["operators"]


def test_unknown_version_is_one_line_error(tmp_path, capsys):
    with pytest.raises(TrtCheckError, match="known versions: .*10.3"):
        load_table("7.1")
    assert main(["check-trt", "--artifacts", str(tmp_path), "--trt-version", "7.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10.3" in err[0] and "10.x" in err[0]


# --- planted problems ----------------------------------------------------------------------------
def test_unsupported_ops():
    m = model(
        [
            helper.make_node("Gelu", ["x"], ["g"], name="ms_gelu", domain="com.microsoft"),
            helper.make_node("Unique", ["g"], ["y"], name="uniq"),
        ],
        [vi("x", F32, [4])],
        [vi("y", F32, None)],
        domains=["com.microsoft"],
    )
    findings = check_model(m, axes={})
    assert "com.microsoft:Gelu" in only(findings, "op", "ms_gelu").message
    assert "Unique is not supported" in only(findings, "op", "uniq").message
    # an op that exists only in newer tables: in 10.x, not in 10.3
    rms = model(
        [helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms")],
        [vi("x", F32, [2, 8])],
        [vi("y", F32, [2, 8])],
        [tensor("s", np.ones(8, np.float32))],
        opset=23,
    )
    assert only(check_model(rms, "10.3"), "op", "rms")
    assert not [f for f in check_model(rms, "10.x") if f.rule == "op"]


def test_uncovered_dynamic_axis():
    m = model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [vi("x", F32, ["batch", "3*frames", None])],
        [vi("y", F32, None)],
    )
    axes = {"batch": {"min": 1, "opt": 1, "max": 4}}
    findings = [f for f in check_model(m, axes=axes) if f.rule == "dynamic-axis"]
    assert len(findings) == 2 and all(f.node == "x" for f in findings)
    assert "'3*frames'" in findings[0].message and "axis 'frames'" in findings[0].message
    assert "dim 2 has neither a size nor an axis name" in findings[1].message
    axes["frames"] = {"min": 1, "opt": 2, "max": 8}
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 5
    assert not check_model(m, axes=axes)
    # an input the manifest does not list gets no profile either
    assert only(check_model(m, axes=axes, inputs=[{"name": "other"}]), "profile", "x")


def qdq_model(zero_point):
    inits = [tensor("s", np.float32(0.05))]
    if zero_point is not None:
        inits.append(tensor("zp", zero_point))
    q_in = ["x", "s", "zp"] if zero_point is not None else ["x", "s"]
    nodes = [
        helper.make_node("QuantizeLinear", q_in, ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", *q_in[1:]], ["y"], name="dequant"),
    ]
    return model(nodes, [vi("x", F32, [1, 8])], [vi("y", F32, [1, 8])], inits)


def test_asymmetric_qdq():
    assert not check_model(qdq_model(np.int8(0)))
    findings = check_model(qdq_model(np.int8(3)))
    assert "asymmetric" in only(findings, "qdq", "quant").message
    assert "asymmetric" in only(findings, "qdq", "dequant").message
    unsigned = check_model(qdq_model(np.uint8(128)))
    assert "uint8" in only(unsigned, "qdq", "quant").message
    assert "uint8" in only(check_model(qdq_model(None)), "qdq", "quant").message
    negative = qdq_model(np.int8(0))
    negative.graph.initializer[0].CopyFrom(tensor("s", np.float32(-0.05)))
    assert "not positive" in only(check_model(negative), "qdq", "quant").message


def per_channel(op, weight_shape, axis, channels, **attrs):
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, weight_shape).astype(np.int8)
    inits = [
        tensor("w_q", w),
        tensor("w_s", np.full(channels, 0.01, np.float32)),
        tensor("w_zp", np.zeros(channels, np.int8)),
    ]
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=axis)
    if op == "Conv":
        x, y = vi("x", F32, [1, weight_shape[1], 8, 8]), vi("y", F32, None)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    elif op == "MatMul":
        x, y = vi("x", F32, [2, weight_shape[0]]), vi("y", F32, None)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    else:
        x, y = vi("x", F32, [2, 8]), vi("y", F32, None)
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", **attrs)
    return model([dq, node], [x], [y], inits)


def test_per_channel_weight_on_wrong_axis():
    assert not check_model(per_channel("Conv", [6, 4, 3, 3], axis=0, channels=6))
    wrong = only(check_model(per_channel("Conv", [6, 6, 3, 3], axis=1, channels=6)), "qdq", "w_dq")
    assert (
        "Conv 'conv'" in wrong.message and "axis 1" in wrong.message and "axis=0" in wrong.message
    )
    # MatMul weight [in, out]: output channels on axis 1
    assert not check_model(per_channel("MatMul", [8, 6], axis=1, channels=6))
    wrong = only(check_model(per_channel("MatMul", [8, 6], axis=0, channels=8)), "qdq", "w_dq")
    assert "MatMul 'proj'" in wrong.message and "axis=1" in wrong.message
    # Gemm: depends on transB
    assert not check_model(per_channel("Gemm", [5, 8], axis=0, channels=5, transB=1))
    assert only(check_model(per_channel("Gemm", [8, 5], axis=0, channels=8)), "qdq", "w_dq")


def test_layernorm_forced_to_fp16():
    inits = [tensor("g", np.ones(8, np.float16)), tensor("b", np.zeros(8, np.float16))]
    m = model(
        [
            helper.make_node("Cast", ["x"], ["h"], name="to_half", to=F16),
            helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="ln", axis=-1),
            helper.make_node("Softmax", ["n"], ["y"], name="attn_softmax", axis=-1),
        ],
        [vi("x", F32, [2, 8])],
        [vi("y", F16, [2, 8])],
        inits,
    )
    findings = check_model(m, precision="fp16")
    assert "LayerNorm forced to fp16" in only(findings, "fp32-norm", "ln").message
    assert "forced to fp16" in only(findings, "fp32-norm", "attn_softmax").message


def test_float64_and_int8_outside_qdq():
    m = model(
        [
            helper.make_node("Cast", ["x"], ["x32"], name="down", to=F32),
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
            helper.make_node("Cast", ["x32"], ["y"], name="up", to=F64),
        ],
        [vi("x", F64, [2, 8]), vi("ids", I64, [3])],
        [vi("y", F64, [2, 8]), vi("rows", I8, [3, 4])],
        [tensor("table", np.ones((6, 4), np.int8))],
    )
    findings = check_model(m)
    assert "float64" in only(findings, "dtype", "x").message
    assert "float64" in only(findings, "dtype", "y").message
    assert "Cast to float64" in only(findings, "dtype", "up").message
    assert "only inside Q/DQ" in only(findings, "dtype", "lookup").message


def test_const_input_and_op_dtype():
    # 10.3 needs Unsqueeze axes as a constant (dynamic axes arrived in 10.7)
    m = model(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")],
        [vi("x", F32, [4]), vi("axes", I64, [1])],
        [vi("y", F32, None)],
    )
    assert only(check_model(m, "10.3", axes={}), "const-input", "unsq")
    assert not [f for f in check_model(m, "10.x", axes={}) if f.rule == "const-input"]
    # integer Pow arrived in 10.8
    p = model(
        [helper.make_node("Pow", ["x", "e"], ["y"], name="ipow")],
        [vi("x", I64, [4])],
        [vi("y", I64, [4])],
        [tensor("e", np.int64(2))],
    )
    assert "int64" in only(check_model(p, "10.3"), "op-dtype", "ipow").message
    assert not check_model(p, "10.x")


# --- an export folder with a hand-made manifest --------------------------------------------------
def write_export(folder, graphs: dict) -> None:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    stages = {}
    for stage, (m, axes) in graphs.items():
        path = folder / f"{stage}.onnx"
        onnx.save(m, str(path))
        stages[stage] = {
            "inputs": [{"name": i.name, "dtype": "float32", "shape": []} for i in m.graph.input],
            "outputs": [],
            "axes": axes,
            "variants": {
                "fp32": {"file": path.name, "sha256": sha256_file(path), "precision": "fp32"}
            },
        }
    manifest = {"format": 1, "stages": stages, "preprocess": {}, "model": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_check_artifacts_and_cli_on_planted_export(tmp_path, capsys):
    batch = {"batch": {"min": 1, "opt": 2, "max": 4}}
    write_export(
        tmp_path / "art",
        {
            "good": (relu_model(), batch),
            "bad": (
                model(
                    [
                        helper.make_node(
                            "Gelu", ["x"], ["y"], name="ms_gelu", domain="com.microsoft"
                        )
                    ],
                    [vi("x", F32, ["tiles", 8])],
                    [vi("y", F32, ["tiles", 8])],
                    domains=["com.microsoft"],
                ),
                batch,
            ),
        },
    )
    report = check_artifacts(tmp_path / "art")
    assert report.graphs == [("good", "fp32"), ("bad", "fp32")]
    assert {(f.stage, f.node, f.rule) for f in report} == {
        ("bad", "ms_gelu", "op"),
        ("bad", "x", "dynamic-axis"),
    }
    out_json = tmp_path / "findings.json"
    code = main(["check-trt", "--artifacts", str(tmp_path / "art"), "--json", str(out_json)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert "bad (fp32) node 'ms_gelu' [op]: com.microsoft:Gelu" in lines[0]
    assert lines[-1].startswith("2 finding(s) in 1 of 2 graphs")
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and len(data["findings"]) == 2
    # the manifest is hash-verified before anything is checked
    (tmp_path / "art" / "good.onnx").write_bytes(b"changed")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        check_artifacts(tmp_path / "art")
