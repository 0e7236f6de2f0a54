"""``fila calibrate``: quantize an export in place and record the variants in its manifest.

Vision stages (modular chain + fused graph) get an ``int8`` Q/DQ variant calibrated on real
images; the decoder gets weight-only ``w8`` / ``w4`` variants; ``embed`` stays as it is. Every
graph is built in a scratch folder first; the artifact folder is touched only at the end, when the
files are moved next to the fp32 graphs (``vit.0.int8.onnx``, ``decoder.w4.onnx``) and
``manifest.json`` is rewritten, so an interrupted run leaves the export as it was.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration.agreement import (
    Variants,
    compare_end_to_end,
    llm_stage,
    pipeline_bytes,
    task_accuracy,
)
from calibration.dataset import (
    ActivationStore,
    CalibrationError,
    collect_stage_data,
    hash_images,
    split_images,
    vision_stages,
)
from calibration.qdq import METHODS
from calibration.report import CalibrationReport, StageRow
from calibration.vision_int8 import INT8_SCHEMES, accuracy_entry, quantize_vision, vision_entries
from calibration.weight_only import (
    EMBED_BLOCK,
    INT4_QDQ_BLOCK,
    LLM_PRECISIONS,
    quantize_decoder,
    quantize_decoder_int4_qdq,
    quantize_embedding,
)
from runtime import onnx_io
from runtime.compare import tolerance
from runtime.manifest import Manifest, file_entry
from runtime.variants import WEIGHT_ONLY_BLOCK

QUANT_SCHEME = INT8_SCHEMES | {
    # accuracy_level 4: MatMulNBits multiplies with int8-quantized activations (per block), the
    # fast CPU kernels; level 0 keeps fp32 activations (w8 at level 0 is slower than fp32 on CPU)
    "w8": {
        "weights": "int8 block-wise symmetric, MatMulNBits",
        "activations": "fp32",
        "format": "com.microsoft MatMulNBits",
    },
    "w4": {
        "weights": "int4 block-wise symmetric, MatMulNBits",
        "activations": "fp32",
        "format": "com.microsoft MatMulNBits",
    },
    "w4-qdq": {
        "weights": "int4 block-wise symmetric (block 32, scale > 0, zero point 0)",
        "activations": "fp16 (W4A16; fp32 when the export has no fp16 decoder)",
        "format": "QDQ: DequantizeLinear(block_size) -> MatMul, "
        "opset 21 (TensorRT INT4 weight-only)",
    },
}


@dataclass
class CalibrationSettings:
    """How to calibrate (the ``fila calibrate`` options)."""

    method: str = "minmax"
    num_calib: int = 32
    num_eval: int = 8
    gate_cosine: float = 0.99
    seed: int = 0
    llm: str | Sequence[str] | None = ("w8", "w4")
    max_excluded: int = 16
    stages: Sequence[str] | None = None  # vision stages to quantize (default: all)
    prompts: str | Path | None = None
    tokens: int = 16
    e2e_images: int = 3
    rank_images: int = 1
    llm_accuracy_level: int = 4
    llm_block_size: int = WEIGHT_ONLY_BLOCK
    threads: int | None = None
    questions: str | Path | None = None

    def llm_precisions(self) -> list[str]:
        """The decoder variants asked for; every other setting checked on the way."""
        if self.method not in METHODS:
            raise CalibrationError(f"unknown --method {self.method!r}; use {', '.join(METHODS)}")
        if not 0 < self.gate_cosine <= 1:
            raise CalibrationError(f"--gate-cosine must be in (0, 1], got {self.gate_cosine}")
        if self.max_excluded < 0:
            raise CalibrationError(f"--max-excluded must be 0 or more, got {self.max_excluded}")
        text = self.llm
        items = text.split(",") if isinstance(text, str) else list(text or [])
        items = [i.strip() for i in items if i and i.strip() and i.strip() != "none"]
        bad = [i for i in items if i not in LLM_PRECISIONS]
        if bad:
            raise CalibrationError(f"--llm {', '.join(bad)}: use w8, w4, both (w8,w4) or none")
        return list(dict.fromkeys(items))


def calibrate(
    artifacts: str | Path,
    images: str | Path,
    settings: CalibrationSettings | None = None,
    log: Callable[[str], None] | None = None,
    **options,
) -> CalibrationReport:
    """Quantize the vision stages (int8) and the decoder (w8/w4) of an export; returns the report
    (also written as calibration_report.md/.json into the export). ``options`` override fields of
    ``settings``; ``questions`` (a JSONL of image, question, answer) adds exact-match task accuracy
    of fp32 and every variant mix."""
    s = dataclasses.replace(settings or CalibrationSettings(), **options)
    llm_list = s.llm_precisions()
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    folder = Path(artifacts)
    manifest = Manifest.load(folder)
    names = chosen_vision_stages(manifest, s.stages)
    split = split_images(images, s.num_calib, s.num_eval, s.seed, s.prompts)
    skipped = f", {len(split.skipped)} unreadable skipped" if split.skipped else ""
    say(f"{len(split.calibration)} calibration / {len(split.held_out)} held-out image(s){skipped}")
    report = CalibrationReport(
        str(folder), s.method, s.gate_cosine, s.seed, s.max_excluded, split.to_dict()
    )
    report.base = manifest.base
    store = ActivationStore()
    work = store.root / "graphs"
    work.mkdir()
    try:
        needed = [
            *names,
            *(["vision"] if "vision" in manifest.stages and "vision" not in names else []),
        ]
        say("running the fp32 vision stages on every image")
        collect_stage_data(manifest, split, store, needed, s.threads)
        results = quantize_vision(manifest, split, store, work, names, s, report, say)
        made = quantize_llm(manifest, work, llm_list, s, say)
        made.vision = {v: res.file for (n, v), res in results.items() if n == "vision"}
        compare_end_to_end(manifest, split, store, made, report, s, say)
        entries = vision_entries(results, split, s) | decoder_entries(
            manifest, made, report, split, s
        )
        report.fp32_bytes = pipeline_bytes(manifest, {})
        commit(folder, work, entries)
    finally:
        store.close()
    if s.questions:
        task_accuracy(folder, s.questions, report, s.tokens, s.threads, say)
    report.seconds = time.perf_counter() - t0
    report.save(folder)
    return report


def chosen_vision_stages(manifest: Manifest, stages: Sequence[str] | None) -> list[str]:
    """The vision stages to quantize: all by default, none for ``--stages none``."""
    names = vision_stages(manifest)
    if not stages:
        return names
    if list(stages) == ["none"]:
        return []
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise CalibrationError(
            f"--stages {', '.join(unknown)}: not a vision stage of this export "
            f"(it has {', '.join(names)})"
        )
    return [s for s in names if s in stages]


def quantize_llm(manifest: Manifest, work: Path, llm_list: list[str], s, say) -> Variants:
    """Weight-only decoders: MatMulNBits of ONNX Runtime's decoder for each precision, and for w4
    the portable graph's INT4 Q/DQ form (TensorRT's weight-only GEMMs)."""
    made = Variants({}, {}, {}, base=manifest.base)
    llm = llm_stage(manifest)
    if "embed" in manifest.stages:  # the table the LLM reads too: same weight-only precisions
        for precision in llm_list:
            say(f"embed {precision} (GatherBlockQuantized)")
            path = work / f"embed.{precision}.onnx"
            _, metrics = quantize_embedding(manifest.stage_path("embed"), path, precision)
            made.embeds[precision] = (path, metrics)
    for precision in llm_list:
        say(f"{llm} {precision}")
        path = work / f"{llm}.{precision}.onnx"
        quantize_decoder(
            manifest.stage_path(llm),
            path,
            precision,
            block_size=s.llm_block_size,
            accuracy_level=s.llm_accuracy_level,
        )
        made.decoders[precision] = path
    if "w4" in llm_list and llm != "decoder" and "decoder" in manifest.stages:
        say("decoder w4 (Q/DQ for TensorRT)")
        made.portable["w4"] = work / "decoder.w4.onnx"
        # from the fp16 graph when there is one: TensorRT's int4 weight-only GEMMs are W4A16
        base = "fp16" if "fp16" in manifest.stage("decoder")["variants"] else "fp32"
        quantize_decoder_int4_qdq(manifest.stage_path("decoder", base), made.portable["w4"])
    return made


def decoder_entries(manifest, made: Variants, report, split, s) -> dict[tuple[str, str], dict]:
    """The manifest entries of the weight-only decoders (unvalidated when nothing measured them)."""
    llm = llm_stage(manifest)
    entries = {}
    for row in report.decoder:
        qdq = row.stage == "decoder" and row.stage != llm
        scheme = QUANT_SCHEME["w4-qdq"] if qdq else QUANT_SCHEME[row.precision]
        entries[(row.stage, row.precision)] = {
            "precision": row.precision,
            "method": f"rtn-block{INT4_QDQ_BLOCK if qdq else s.llm_block_size}-symmetric",
            "calibration_set_sha256": None,
            "evaluation_set_sha256": hash_images(split.held_out),
            "excluded_layers": [],
            "accuracy": accuracy_entry(row.metrics),
            "validated": row.validated,
            "gate": {"rel_l2": tolerance(row.precision)},
            "scheme": scheme
            if qdq
            else scheme | {"accuracy_level": s.llm_accuracy_level, "block_size": s.llm_block_size},
        }
    for precision, (path, metrics) in made.embeds.items():
        ok = metrics.rel_l2 <= tolerance(precision)
        report.decoder.append(
            StageRow(
                "embed",
                precision,
                path.name,
                onnx_io.graph_bytes(path),
                onnx_io.graph_bytes(manifest.stage_path("embed")),
                metrics,
                ok,
                f"table rel L2 <= {tolerance(precision)}",
            )
        )
        entries[("embed", precision)] = {
            "precision": precision,
            "method": f"rtn-block{EMBED_BLOCK}-symmetric",
            "accuracy": accuracy_entry(metrics),
            "validated": ok,
            "backends": ["onnxruntime"],  # com.microsoft.GatherBlockQuantized
            "scheme": {
                "weights": f"{precision[1]}-bit blocks of {EMBED_BLOCK}, fp16 scales",
                "format": "com.microsoft GatherBlockQuantized",
            },
        }
    made_ = [(llm, p) for p in made.decoders] + [("decoder", p) for p in made.portable]
    for stage, precision in made_:  # not measured (no held-out images): recorded unvalidated
        entries.setdefault(
            (stage, precision),
            {"precision": precision, "validated": False, "method": "rtn-block32-symmetric"},
        )
    return entries


def commit(folder: Path, work: Path, entries: dict[tuple[str, str], dict]) -> None:
    """Move the graphs into the export and record them; the manifest is re-read so that variants
    written meanwhile by someone else are kept."""
    manifest = Manifest.load(folder)
    for (stage, precision), extra in entries.items():
        name = f"{stage}.{precision}.onnx"
        src, dst = work / name, folder / name
        data_src, data_dst = onnx_io.data_path(src), onnx_io.data_path(dst)
        if data_src.exists():
            shutil.move(data_src, data_dst)
        else:
            data_dst.unlink(missing_ok=True)
        shutil.move(src, dst)
        entry = file_entry(folder, dst) | extra
        if data_dst.exists():
            entry["external_data"] = file_entry(folder, data_dst)
        manifest.stages[stage]["variants"][precision] = entry
    manifest.save()
