"""INT8 vision variants of an export (part of ``fila calibrate``): each vision stage in TensorRT's
layout (``int8``, in fp16 compute) and ONNX Runtime's (``int8-cpu``: the same Q/DQ in fp32, or
for stages with convolutions a layout of its own), their report rows, the int8 chain's accuracy
end to end, and their manifest entries."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from calibration.dataset import CalibrationSplit, hash_images
from calibration.qdq import fp16_compute, has_conv
from calibration.report import StageRow
from calibration.sensitivity import StageQuantization, evaluate, quantize_vision_stage
from runtime import onnx_io
from runtime.backends.onnxruntime import OrtRunner, SessionLoader
from runtime.compare import MetricAccumulator
from runtime.manifest import Manifest
from runtime.vision import walk_chain

INT8_SCHEMES = {
    "int8": {
        "activations": "int8 symmetric per-tensor (zero point 0)",
        "weights": "int8 symmetric per-channel (output-channel axis)",
        "format": "QDQ in an fp16 graph (TensorRT's strongly typed int8)",
        "compute": "fp16 outside Conv/MatMul/Gemm; LayerNorm, Softmax, ReduceMean in fp32; "
        "fp32 inputs and outputs",
    },
    "int8-fp32": {  # the int8-cpu of a stage without convolutions
        "activations": "int8 symmetric per-tensor (zero point 0)",
        "weights": "int8 symmetric per-channel (output-channel axis)",
        "format": "QDQ in an fp32 graph, run by ONNX Runtime's CPU provider as "
        "MatMulIntegerToFloat",
        "kept_fp32": "all ops but Conv/MatMul/Gemm",
    },
    "int8-cpu": {
        "activations": "uint8 asymmetric per-tensor (zero points), Q/DQ on inputs and outputs",
        "weights": "int8 symmetric per-channel (output-channel axis) in a 7-bit range "
        "(reduce_range: no int16 saturation in x86 kernels without VNNI), int32 bias",
        "format": "QDQ, fused by ONNX Runtime into QLinearConv / QLinearMatMul (CPU)",
        "kept_fp32": "ops whose inputs and outputs are not quantized",
    },
}


CPU_INT8 = "int8-cpu"  # ONNX Runtime's CPU layout of a stage with convolutions (calibration.qdq)


def int8_jobs(manifest: Manifest, names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(stage, variant, layout) to quantize: every stage in TensorRT's layout (``int8``, and its
    fp32 form ONNX Runtime's ``int8-cpu`` for stages without convolutions), and the stages with
    convolutions in ONNX Runtime's CPU layout (their ``int8-cpu``): its CPU provider has no int8
    convolution for the TensorRT layout."""
    jobs = [(name, "int8", "tensorrt") for name in names]
    return jobs + [(n, CPU_INT8, "cpu") for n in names if has_conv(manifest.stage_path(n))]


def quantize_vision(manifest, split, store, work, names, s, report, say) -> dict:
    """An int8 variant of each named vision stage (sensitivity pass when one misses its gate),
    its report row, and the whole int8 chain's accuracy when every chain stage was quantized.
    Returns {(stage, variant): StageQuantization}."""
    results: dict[tuple[str, str], StageQuantization] = {}
    jobs = int8_jobs(manifest, names)
    with_conv = {n for n, _, layout in jobs if layout == "cpu"}
    for name, variant, layout in jobs:
        res = quantize_vision_stage(
            manifest.stage_path(name),
            work / f"{name}.{variant}.onnx",
            store,
            name,
            s.method,
            s.gate_cosine,
            s.max_excluded,
            s.rank_images,
            s.threads,
            store.root,
            say,
            layout,
        )
        if layout != "tensorrt":
            results[(name, variant)] = res
            continue
        keep = name not in with_conv  # a stage with convolutions has its own int8-cpu layout
        fp32_form, results[(name, variant)] = tensorrt_int8(name, res, work, store, s, say, keep)
        if keep:
            results[(name, CPU_INT8)] = fp32_form
    fp32_bytes = {n: onnx_io.graph_bytes(manifest.stage_path(n)) for n in names}
    for (name, variant), res in results.items():
        if res.message:
            report.messages.append(res.message)
        row = stage_row(name, variant, res.file.name, res, fp32_bytes[name], s.gate_cosine)
        report.stages.append(row)
    chain = manifest.vision_chain
    limit = min(s.e2e_images, len(split.held_out))
    int8 = {name: res for (name, variant), res in results.items() if variant == "int8"}
    if chain and all(n in int8 for n in chain) and "vision" in manifest.stages:
        say("modular int8 chain end to end")
        report.modular_chain = chain_accuracy(manifest, int8, store, limit, s.threads)
    return results


def tensorrt_int8(
    name: str, res: StageQuantization, work: Path, store, s, say, keep_fp32: bool
) -> tuple:
    """(the fp32 Q/DQ graph as ``int8-cpu`` when ``keep_fp32``, the ``int8`` variant TensorRT
    builds: the same graph in fp16 compute, re-measured against the fp32 stage)."""
    fp32_file = work / f"{name}.{CPU_INT8}.onnx"
    model = onnx_io.load(res.file)
    if keep_fp32:
        onnx_io.save(model, fp32_file)  # under its own name, with its own external data
    fp16_compute(model, res.file)
    del model
    metrics = evaluate(onnx_io.session(res.file, s.threads), store, name)
    say(f"{name}: int8 in fp16 compute (TensorRT's): cosine {metrics.cosine:.5f}")
    validated = metrics.cosine >= s.gate_cosine
    message = res.message
    if res.validated and not validated:
        message = (
            f"stage {name}: the int8 graph meets its gate in fp32 compute but not in fp16 "
            f"(cosine {metrics.cosine:.5f} < {s.gate_cosine}); written with validated: false"
        )
    fp16 = dataclasses.replace(res, metrics=metrics, validated=validated, message=message)
    return dataclasses.replace(res, file=fp32_file), fp16


def stage_row(name, variant, file, res: StageQuantization, fp32_bytes, gate) -> StageRow:
    return StageRow(
        name,
        variant,
        file,
        onnx_io.graph_bytes(res.file),
        fp32_bytes,
        res.metrics,
        res.validated,
        f"cosine >= {gate}",
        res.excluded,
        res.candidates,
        res.quantized,
        res.full_metrics.cosine if res.full_metrics else None,
        res.trials,
        res.message,
        res.layout_problems,
    )


def chain_accuracy(manifest, results: dict, store, limit: int, threads: int | None):
    """The int8 chain walked end to end (errors compounding) against the fused fp32 graph."""
    chain = [manifest.spec(n) for n in manifest.vision_chain]
    runners = {
        spec.name: OrtRunner(SessionLoader(results[spec.name].file, threads=threads), spec.name)
        for spec in chain
    }
    acc = MetricAccumulator()
    for index in range(limit):
        inputs, ref = store.get("eval", index, "vision")
        tensors = walk_chain(chain, lambda name, feeds: runners[name].infer(feeds), inputs)
        acc.add(ref, {"image_features": tensors["image_features"]})
    return acc.result()


def vision_entries(results: dict, split: CalibrationSplit, s) -> dict[tuple[str, str], dict]:
    """The manifest entries of the int8 vision variants (``int8-cpu``: ONNX Runtime's only)."""
    entries = {}
    for (name, variant), res in results.items():
        entries[(name, variant)] = {
            "precision": "int8",
            "method": s.method,
            "calibration_set_sha256": split.calibration_set_sha256,
            "evaluation_set_sha256": hash_images(split.held_out),
            "excluded_layers": res.excluded,
            "accuracy": accuracy_entry(res.metrics),
            "validated": res.validated,
            "gate": {"cosine": s.gate_cosine},
            "scheme": INT8_SCHEMES[scheme_name(variant, res.layout)],
        }
        if variant == CPU_INT8:
            entries[(name, variant)]["backends"] = ["onnxruntime"]
    return entries


def scheme_name(variant: str, layout: str) -> str:
    """The QUANT_SCHEME entry of an int8 variant made in ``layout``."""
    if variant == CPU_INT8 and layout == "tensorrt":
        return "int8-fp32"
    return variant


def accuracy_entry(m) -> dict:
    return {
        "cosine": round(m.cosine, 6),
        "sqnr_db": round(m.sqnr_db, 3),
        "rel_l2": round(m.rel_l2, 6),
        "min_image_cosine": round(m.min_image_cosine, 6),
        "images": m.images,
    }
