"""End to end: what the quantized variants do to the model's output, against the fp32 export.

Greedy tokens (EOS ignored, so every image compares the same number) and the prefill logits of
every vision x decoder mix on the held-out images, with the fp32 vision graph's features as each
decoder's input (so a decoder row isolates the decoder's error); and, with a question set, the
exact-match task accuracy of fp32 and of each mix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.report import AgreementRow, CalibrationReport, StageRow, decoder_accuracy
from runtime import onnx_io
from runtime.answers import exact_match, pipeline_answers, read_questions
from runtime.backends import load_runner
from runtime.backends.onnxruntime import OrtRunner, SessionLoader
from runtime.compare import token_agreement, tolerance
from runtime.generate import SamplingParams, generate
from runtime.image_io import load_image
from runtime.manifest import Manifest
from runtime.pipeline import FilaPipeline, prompt_builder
from runtime.preprocess import preprocess
from runtime.variants import choose_decoder


def llm_stage(manifest: Manifest) -> str:
    """The decoder the weight-only variants are made for: the one ONNX Runtime runs
    (``decoder_gqa`` when exported), since MatMulNBits runs on ONNX Runtime only."""
    return choose_decoder(manifest, "onnxruntime")


@dataclass
class Variants:
    """The graphs made so far, in the scratch folder: the int8 fused vision graphs (by variant:
    ``int8``, ``int8-cpu``), the weight-only decoders of ONNX Runtime's graph and of the portable
    (TensorRT) graph."""

    vision: dict[str, Path]  # variant -> fused vision graph
    decoders: dict[str, Path]  # precision -> graph
    portable: dict[str, Path]  # precision -> graph
    base: str = "fp32"  # the export's own precision: what every variant is compared with
    embeds: dict = field(default_factory=dict)  # precision -> (graph, accuracy of the table)

    def decoder_files(self) -> dict[str, Path]:
        """Decoder key (``w4``, ``trt-w4``) -> graph."""
        return self.decoders | {f"trt-{p}": path for p, path in self.portable.items()}

    def configs(self) -> list[tuple[str, str]]:
        """(vision variant, decoder key) of every mix compared with base/base."""
        out = [(self.base, p) for p in self.decoders]
        out += [(v, p) for v in self.vision for p in [self.base, *self.decoders]]
        return out + [(self.base, f"trt-{p}") for p in self.portable]


def greedy(pipe: FilaPipeline, runner, embeds: np.ndarray, tokens: int):
    """``tokens`` greedy tokens of one decoder variant, EOS ignored, and its prefill logits."""
    decoder = pipe.new_decoder(embeds.shape[1] + tokens, runner=runner)
    mask = np.ones(embeds.shape[:2], dtype=np.int64)
    out = generate(decoder, pipe.embed, embeds, mask, tokens, SamplingParams())
    return out.token_ids[0], out.first_logits


def compare_end_to_end(manifest, split, store, made: Variants, report, settings, say) -> None:
    """Fill the report's decoder rows and greedy-agreement rows (``settings.e2e_images``
    held-out images, ``settings.tokens`` tokens each)."""
    limit = min(settings.e2e_images, len(split.held_out))
    if not limit or not (made.decoders or made.vision):
        return
    threads, llm, base = settings.threads, llm_stage(manifest), made.base
    runners = {
        n: load_runner("onnxruntime", manifest, n, base, threads=threads) for n in ("embed", llm)
    }
    pipe = FilaPipeline(manifest, runners, prompt_builder(manifest), decoder_stage=llm)
    decoders = {base: runners[llm]}
    for key, path in made.decoder_files().items():
        decoders[key] = OrtRunner(SessionLoader(path, threads=threads), name=key)
    vision = {v: onnx_io.session(path, threads) for v, path in made.vision.items()}
    configs = made.configs()
    tokens_by = {c: [] for c in [(base, base), *configs]}
    logits_by = {d: [] for _, d in tokens_by}
    for index in range(limit):
        record = split.held_out[index]
        image = preprocess(load_image(record.path), manifest.preprocess)
        inputs, ref = store.get("eval", index, "vision")
        features = {base: ref["image_features"]}
        for v, sess in vision.items():
            features[v] = sess.run(["image_features"], inputs)[0]
        _, ids = pipe.prompts.request_ids(record.prompt, [image.num_tokens])
        embeds = {v: pipe.prompt_embeds(ids, [image], [f]) for v, f in features.items()}
        for v, d in tokens_by:
            say(
                f"greedy {settings.tokens} tokens, image {index + 1}/{limit}: vision {v}, decoder {d}"
            )
            toks, first = greedy(pipe, decoders[d], embeds[v], settings.tokens)
            tokens_by[(v, d)].append(toks)
            if v == base:
                logits_by[d].append(first)
    decoder_rows(manifest, llm, made, logits_by, report)
    agreement_rows(manifest, made, configs, tokens_by, report, limit, settings.tokens)


def decoder_rows(manifest, llm: str, made: Variants, logits_by: dict, report) -> None:
    """Each weight-only decoder's prefill logits against fp32's, judged by its tolerance."""
    variants = [(llm, p, p, path) for p, path in made.decoders.items()]
    variants += [("decoder", p, f"trt-{p}", path) for p, path in made.portable.items()]
    for stage, precision, key, path in variants:
        m = decoder_accuracy(logits_by[made.base], logits_by[key])
        tol = tolerance(precision)
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
        fp32_bytes = onnx_io.graph_bytes(manifest.stage_path(stage))
        report.decoder.append(
            StageRow(
                stage,
                precision,
                path.name,
                onnx_io.graph_bytes(path),
                fp32_bytes,
                m,
                ok,
                f"rel L2 <= {tol}",
                message=msg,
            )
        )


def agreement_rows(manifest, made: Variants, configs, tokens_by, report, limit, tokens) -> None:
    """Greedy-token agreement of every mix with the fp32 pipeline, and its loaded bytes."""
    base = made.base
    reference = tokens_by[(base, base)]
    files = made.decoder_files()
    for v, d in configs:
        portable = d.startswith("trt-")
        precision = d.removeprefix("trt-")
        parts = [
            f"vision={v}" if v != base else "",
            f"decoder={precision}" if precision != base else "",
        ]
        spec = ",".join(x for x in parts if x)
        label = f"{spec} (TensorRT Q/DQ graph, run on ONNX Runtime)" if portable else spec
        agree = token_agreement(reference, tokens_by[(v, d)])
        replaced = {"vision": made.vision.get(v), "decoder": files.get(d)}
        report.end_to_end.append(
            AgreementRow(
                label,
                limit,
                tokens,
                agree.token_agreement,
                agree.exact_match_rate,
                agree.mean_first_divergence,
                pipeline_bytes(manifest, replaced),
                precision=spec,
                decoder="portable" if portable else "auto",
            )
        )


def pipeline_bytes(manifest: Manifest, replaced: dict[str, Path | None]) -> int:
    """Bytes of the graphs an ONNX Runtime fused pipeline loads (vision, embed, its decoder),
    some replaced (``replaced["decoder"]`` stands for the decoder stage it runs)."""
    total = 0
    for stage in ("vision", "embed", "decoder"):
        name = llm_stage(manifest) if stage == "decoder" else stage
        if name in manifest.stages:
            total += onnx_io.graph_bytes(replaced.get(stage) or manifest.stage_path(name))
    return total


def task_accuracy(
    folder: Path, questions, report: CalibrationReport, tokens: int, threads, say
) -> None:
    """Answers of the fp32 export and of each variant mix in the report, scored by exact match."""
    records = read_questions(questions)
    report.questions = str(questions)
    opts = {"threads": threads} if threads else {}
    configs = [(Manifest.load(folder).base, None, "auto")]
    configs += [(row.config, row.precision, row.decoder) for row in report.end_to_end]
    reference = None
    for label, spec, decoder in configs:
        say(f"task accuracy: {label} on {len(records)} question(s)")
        with warnings.catch_warnings():  # a variant below its gate is scored all the same
            warnings.simplefilter("ignore")
            pipe = FilaPipeline.from_artifacts(folder, precision=spec, decoder=decoder, **opts)
        answers = pipeline_answers(pipe, records, tokens)
        pipe.close()
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        report.answers.append(
            {"config": label, **exact_match(records, answers), "same_as_fp32": same}
        )
