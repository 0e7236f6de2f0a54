"""``fila calibrate``: quantize an export in place and record the variants in its manifest.

Vision stages (modular chain + fused graph) get an ``int8`` Q/DQ variant calibrated on real
images; the decoder gets weight-only ``w8`` / ``w4`` variants; ``embed`` stays as it is. Every
graph is built in a scratch folder first; the artifact folder is touched only at the end, when the
files are moved next to the fp32 graphs (``vit.0.int8.onnx``, ``decoder.w4.onnx``) and
``manifest.json`` is rewritten, so an interrupted run leaves the export as it was.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from calibration.dataset import (
    ActivationStore,
    CalibrationError,
    collect_stage_data,
    hash_images,
    split_images,
    vision_stages,
)
from calibration.quantize import (
    LLM_PRECISIONS,
    METHODS,
    MetricAccumulator,
    StageQuantization,
    file_size,
    quantize_decoder,
    quantize_decoder_int4_qdq,
    quantize_vision_stage,
    session,
)
from calibration.report import (
    DECODER_TOLERANCES,
    AgreementRow,
    CalibrationReport,
    StageRow,
    agreement,
    decoder_accuracy,
    greedy_tokens,
    prompt_embeds,
)
from runtime.manifest import Manifest, file_entry

QUANT_SCHEME = {
    "int8": {
        "activations": "int8 symmetric per-tensor (zero point 0)",
        "weights": "int8 symmetric per-channel (output-channel axis)",
        "format": "QDQ",
        "kept_fp32": "all ops but Conv/MatMul/Gemm",
    },
    # accuracy_level 4: MatMulNBits multiplies with int8-quantized activations (per block), the
    # fast CPU kernels; level 0 keeps fp32 activations (w8 at level 0 is slower than fp32 on CPU)
    "w8": {
        "weights": "int8 block-wise symmetric (block 32), MatMulNBits",
        "activations": "fp32",
        "format": "com.microsoft MatMulNBits",
    },
    "w4": {
        "weights": "int4 block-wise symmetric (block 32), MatMulNBits",
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


def parse_llm(text: str | Sequence[str] | None) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text or [])
    items = [i.strip() for i in items if i and i.strip() and i.strip() != "none"]
    bad = [i for i in items if i not in LLM_PRECISIONS]
    if bad:
        raise CalibrationError(f"--llm {', '.join(bad)}: use w8, w4, both (w8,w4) or none")
    return list(dict.fromkeys(items))


def calibrate(
    artifacts: str | Path,
    images: str | Path,
    method: str = "minmax",
    num_calib: int = 32,
    num_eval: int = 8,
    gate_cosine: float = 0.99,
    seed: int = 0,
    llm: str | Sequence[str] | None = ("w8", "w4"),
    max_excluded: int = 16,
    stages: Sequence[str] | None = None,
    prompts: str | Path | None = None,
    tokens: int = 16,
    e2e_images: int = 3,
    rank_images: int = 1,
    llm_accuracy_level: int = 4,
    threads: int | None = None,
    questions: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> CalibrationReport:
    """Quantize the vision stages (int8) and the decoder (w8/w4) of an export; returns the report
    (also written as calibration_report.md/.json into the export). ``questions`` (a JSONL of
    image, question, answer) adds exact-match task accuracy of fp32 and every variant mix."""
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    if method not in METHODS:
        raise CalibrationError(f"unknown --method {method!r}; use {', '.join(METHODS)}")
    if not 0 < gate_cosine <= 1:
        raise CalibrationError(f"--gate-cosine must be in (0, 1], got {gate_cosine}")
    if max_excluded < 0:
        raise CalibrationError(f"--max-excluded must be 0 or more, got {max_excluded}")
    llm_list = parse_llm(llm)
    folder = Path(artifacts)
    manifest = Manifest.load(folder)
    names = vision_stages(manifest)
    if stages:
        unknown = [s for s in stages if s not in names]
        if unknown:
            raise CalibrationError(
                f"--stages {', '.join(unknown)}: not a vision stage of this export "
                f"(it has {', '.join(names)})"
            )
        names = [s for s in names if s in stages]
    split = split_images(images, num_calib, num_eval, seed, prompts)
    say(
        f"{len(split.calibration)} calibration / {len(split.held_out)} held-out image(s)"
        + (f", {len(split.skipped)} unreadable skipped" if split.skipped else "")
    )
    report = CalibrationReport(
        str(folder), method, gate_cosine, seed, max_excluded, split.to_dict()
    )
    eval_hash = hash_images(split.held_out)
    store = ActivationStore()
    work = store.root / "graphs"
    work.mkdir()
    entries: dict[tuple[str, str], dict] = {}
    try:
        needed = sorted(
            set(names) | {"vision"} & set(manifest.stages), key=[*names, "vision"].index
        )
        say("running the fp32 vision stages on every image")
        collect_stage_data(manifest, split, store, needed, threads)
        results: dict[str, StageQuantization] = {}
        for name in names:
            res = quantize_vision_stage(
                manifest.stage_path(name),
                work / f"{name}.int8.onnx",
                store,
                name,
                method,
                gate_cosine,
                max_excluded,
                rank_images,
                threads,
                store.root,
                say,
            )
            results[name] = res
            if res.message:
                report.messages.append(res.message)
            report.stages.append(
                StageRow(
                    name,
                    "int8",
                    f"{name}.int8.onnx",
                    file_size(res.file),
                    file_size(manifest.stage_path(name)),
                    res.metrics,
                    res.validated,
                    f"cosine >= {gate_cosine}",
                    res.excluded,
                    res.candidates,
                    res.quantized,
                    res.full_metrics.cosine if res.full_metrics else None,
                    res.trials,
                    res.message,
                    res.layout_problems,
                )
            )
            entries[(name, "int8")] = {
                "precision": "int8",
                "method": method,
                "calibration_set_sha256": split.calibration_set_sha256,
                "evaluation_set_sha256": eval_hash,
                "excluded_layers": res.excluded,
                "accuracy": _accuracy(res.metrics),
                "validated": res.validated,
                "gate": {"cosine": gate_cosine},
                "scheme": QUANT_SCHEME["int8"],
            }
        chain = [s for s in manifest.data.get("vision_chain", []) if s in manifest.stages]
        limit = min(e2e_images, len(split.held_out))
        if chain and all(s in results for s in chain) and "vision" in manifest.stages:
            say("modular int8 chain end to end")
            report.modular_chain = _chain_accuracy(chain, results, store, limit, threads)
        decoder_files = {}
        llm = llm_stage(manifest)
        for precision in llm_list:
            say(f"{llm} {precision}")
            path = work / f"{llm}.{precision}.onnx"
            quantize_decoder(
                manifest.stage_path(llm), path, precision, accuracy_level=llm_accuracy_level
            )
            decoder_files[precision] = path
        trt_files = {}
        if "w4" in llm_list and llm != "decoder":  # the portable graph: TensorRT's INT4 WoQ form
            say("decoder w4 (Q/DQ for TensorRT)")
            trt_files["w4"] = work / "decoder.w4.onnx"
            # from the fp16 graph when there is one: TensorRT's int4 weight-only GEMMs are W4A16
            base = "fp16" if "fp16" in manifest.stage("decoder")["variants"] else "fp32"
            quantize_decoder_int4_qdq(manifest.stage_path("decoder", base), trt_files["w4"])
        if limit and (decoder_files or results.get("vision")):
            _end_to_end(
                manifest,
                split,
                store,
                results,
                decoder_files,
                report,
                tokens,
                limit,
                threads,
                say,
                trt_files,
            )
        for row in report.decoder:
            qdq = row.stage == "decoder" and row.stage != llm
            scheme = (
                QUANT_SCHEME["w4-qdq"]
                if qdq
                else (QUANT_SCHEME[row.precision] | {"accuracy_level": llm_accuracy_level})
            )
            entries[(row.stage, row.precision)] = {
                "precision": row.precision,
                "method": "rtn-block32-symmetric",
                "calibration_set_sha256": None,
                "evaluation_set_sha256": eval_hash,
                "excluded_layers": [],
                "accuracy": _accuracy(row.metrics),
                "validated": row.validated,
                "gate": {"rel_l2": DECODER_TOLERANCES[row.precision]},
                "scheme": scheme,
            }
        if not report.decoder:  # no held-out run (no images to compare on): still record them
            made = [(llm, p) for p in decoder_files] + [("decoder", p) for p in trt_files]
            for stage, precision in made:
                entries[(stage, precision)] = {
                    "precision": precision,
                    "validated": False,
                    "method": "rtn-block32-symmetric",
                }
        report.fp32_bytes = _pipeline_bytes(manifest, {})
        _commit(folder, work, entries)
    finally:
        store.close()
    if questions:
        _task_accuracy(folder, questions, report, tokens, threads, say)
    report.seconds = time.perf_counter() - t0
    report.save(folder)
    return report


def _accuracy(m) -> dict:
    return {
        "cosine": round(m.cosine, 6),
        "sqnr_db": round(m.sqnr_db, 3),
        "rel_l2": round(m.rel_l2, 6),
        "min_image_cosine": round(m.min_image_cosine, 6),
        "images": m.images,
    }


def _chain_accuracy(chain, results, store, limit, threads):
    sessions = {name: session(results[name].file, threads) for name in chain}
    acc = MetricAccumulator()
    for index in range(limit):
        inputs, ref = store.get("eval", index, "vision")
        maps, hidden = {}, None
        for name in chain:
            sess = sessions[name]
            if name == "convnext":
                feeds = {"global_view": inputs["global_view"]}
            elif name == "vit.0":
                feeds = {"pixel_values": inputs["pixel_values"]}
            elif name.startswith("cvfm."):
                k = name.split(".")[1]
                feeds = {"hidden": hidden, f"stage{k}": maps[f"stage{k}"]}
            else:
                feeds = {"hidden": hidden}
            out = dict(
                zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True)
            )
            if name == "convnext":
                maps = out
            elif name == "projector":
                acc.add(ref, out)
            else:
                hidden = out["hidden_out"]
    return acc.result()


def _end_to_end(
    manifest,
    split,
    store,
    results,
    decoder_files,
    report,
    tokens,
    limit,
    threads,
    say,
    trt_files=None,
) -> None:
    """Greedy tokens and first logits of every variant against fp32 on held-out images.
    ``trt_files``: Q/DQ weight-only variants of the portable decoder (made for TensorRT), run
    here with ONNX Runtime to measure what they do to the numbers."""
    from runtime.image_io import load_image
    from runtime.pipeline import FilaPipeline, make_runner
    from runtime.preprocess import preprocess
    from runtime.prompt import PromptBuilder

    opts = {"threads": threads} if threads else {}
    runners = {"embed": make_runner("onnxruntime", manifest.stage_path("embed"), "embed", **opts)}
    prompts = PromptBuilder.from_folder(
        manifest.folder, manifest.data.get("tokenizer", "tokenizer.json")
    )
    if manifest.data.get("chat_template"):
        prompts.chat_template = manifest.data["chat_template"]
    llm = llm_stage(manifest)
    pipe = FilaPipeline(manifest, runners, prompts, decoder_stage=llm)
    decoders = {"fp32": make_runner("onnxruntime", manifest.stage_path(llm), llm, **opts)}
    for precision, path in decoder_files.items():
        decoders[precision] = make_runner("onnxruntime", path, llm, **opts)
    trt_files = trt_files or {}
    for precision, path in trt_files.items():
        decoders[f"trt-{precision}"] = make_runner("onnxruntime", path, "decoder", **opts)
    vision_int8 = session(results["vision"].file, threads) if "vision" in results else None
    configs = [("fp32", p) for p in decoder_files] + (
        [("int8", p) for p in ["fp32", *decoder_files]] if vision_int8 else []
    )
    configs += [("fp32", f"trt-{p}") for p in trt_files]
    tokens_by: dict[tuple[str, str], list[list[int]]] = {("fp32", "fp32"): []}
    logits_by: dict[str, list[np.ndarray]] = {d: [] for _, d in [("fp32", "fp32"), *configs]}
    for c in configs:
        tokens_by[c] = []
    for index in range(limit):
        record = split.held_out[index]
        image = preprocess(load_image(record.path), manifest.preprocess)
        inputs, ref = store.get("eval", index, "vision")
        feats = {"fp32": ref["image_features"]}
        if vision_int8 is not None:
            feats["int8"] = vision_int8.run(["image_features"], inputs)[0]
        embeds = {v: prompt_embeds(pipe, image, f, record.prompt) for v, f in feats.items()}
        for v, d in [("fp32", "fp32"), *configs]:
            say(f"greedy {tokens} tokens, image {index + 1}/{limit}: vision {v}, decoder {d}")
            toks, first = greedy_tokens(pipe, decoders[d], embeds[v], tokens)
            tokens_by[(v, d)].append(toks)
            if v == "fp32":
                logits_by[d].append(first)
    variants = [(llm, p, p, path) for p, path in decoder_files.items()]
    variants += [("decoder", p, f"trt-{p}", path) for p, path in trt_files.items()]
    for stage, precision, key, path in variants:
        m = decoder_accuracy(logits_by["fp32"], logits_by[key])
        tol = DECODER_TOLERANCES[precision]
        ok = m.rel_l2 <= tol
        msg = (
            ""
            if ok
            else (
                f"{stage} {precision}: logits rel L2 {m.rel_l2:.3f} > {tol} (cosine "
                f"{m.cosine:.5f}); written with validated: false"
            )
        )
        if msg:
            report.messages.append(msg)
        report.decoder.append(
            StageRow(
                stage,
                precision,
                path.name,
                file_size(path),
                file_size(manifest.stage_path(stage)),
                m,
                ok,
                f"rel L2 <= {tol}",
                message=msg,
            )
        )
    reference = tokens_by[("fp32", "fp32")]
    files = {
        "vision": results["vision"].file if "vision" in results else None,
        **decoder_files,
        **{f"trt-{p}": path for p, path in trt_files.items()},
    }
    for v, d in configs:
        portable = d.startswith("trt-")
        precision = d[4:] if portable else d
        spec = ",".join(
            x
            for x in (
                f"vision={v}" if v != "fp32" else "",
                f"decoder={precision}" if precision != "fp32" else "",
            )
            if x
        )
        label = f"{spec} (TensorRT Q/DQ graph, run on ONNX Runtime)" if portable else spec
        report.end_to_end.append(
            AgreementRow(
                label,
                limit,
                tokens,
                **agreement(reference, tokens_by[(v, d)], tokens),
                bytes=_pipeline_bytes(
                    manifest,
                    {
                        "vision": files["vision"] if v == "int8" else None,
                        "decoder": files.get(d) if d != "fp32" else None,
                    },
                ),
                precision=spec,
                decoder="portable" if portable else "auto",
            )
        )


def _task_accuracy(
    folder: Path, questions, report: CalibrationReport, tokens: int, threads, say
) -> None:
    """Answers of the fp32 export and of each variant mix in the report, scored by exact match."""
    import warnings

    from runtime.answers import exact_match, pipeline_answers, read_questions
    from runtime.pipeline import FilaPipeline

    records = read_questions(questions)
    report.questions = str(questions)
    opts = {"threads": threads} if threads else {}
    configs = [("fp32", "fp32", "auto")]
    configs += [(row.config, row.precision, row.decoder) for row in report.end_to_end]
    reference = None
    for label, spec, decoder in configs:
        say(f"task accuracy: {label} on {len(records)} question(s)")
        with warnings.catch_warnings():  # a variant below its gate is scored all the same
            warnings.simplefilter("ignore")
            pipe = FilaPipeline.from_artifacts(folder, precision=spec, decoder=decoder, **opts)
        answers = pipeline_answers(pipe, records, tokens)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        report.answers.append(
            {"config": label, **exact_match(records, answers), "same_as_fp32": same}
        )


def _pipeline_bytes(manifest: Manifest, replaced: dict[str, Path | None]) -> int:
    """Bytes of the graphs an ONNX Runtime fused pipeline loads (vision, embed, its decoder),
    some replaced (``replaced["decoder"]`` stands for the decoder stage it runs)."""
    total = 0
    for stage in ("vision", "embed", "decoder"):
        name = llm_stage(manifest) if stage == "decoder" else stage
        if name in manifest.stages:
            path = replaced.get(stage) or manifest.stage_path(name)
            total += file_size(path)
    return total


def llm_stage(manifest: Manifest) -> str:
    """The decoder the weight-only variants are made for: the one ONNX Runtime runs
    (``decoder_gqa`` when exported), since MatMulNBits runs on ONNX Runtime only."""
    from runtime.pipeline import choose_decoder

    return choose_decoder(manifest, "onnxruntime")


def _commit(folder: Path, work: Path, entries: dict[tuple[str, str], dict]) -> None:
    """Move the graphs into the export and record them; the manifest is re-read so that variants
    written meanwhile by someone else are kept."""
    manifest = Manifest.load(folder, verify=False)
    for (stage, precision), extra in entries.items():
        name = f"{stage}.{precision}.onnx"
        src, dst = work / name, folder / name
        data_src, data_dst = work / f"{name}.data", folder / f"{name}.data"
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
