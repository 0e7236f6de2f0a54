"""The calibration report: per-stage accuracy against fp32, end-to-end greedy agreement, sizes.

Per stage (held-out images): cosine, SQNR (dB) and relative L2 of the quantized graph's outputs
against the fp32 graph's, both fed the same fp32 upstream activations. Decoder variants are
measured on their prefill logits for the held-out prompts (image features from the fp32 vision
graph, so the decoder's own error is isolated). End to end: greedy generation of the quantized
pipeline against the fp32 pipeline for ``tokens`` tokens per image (EOS ignored, so every image
compares the same number of tokens): positional token agreement, whole-sequence exact-match rate
and mean first-divergence position (``tokens`` where there is none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.compare import MetricAccumulator, Metrics

REPORT_NAME = "calibration_report"


@dataclass
class StageRow:
    stage: str
    precision: str
    file: str
    bytes: int
    fp32_bytes: int
    metrics: Metrics
    validated: bool
    gate: str
    excluded_layers: list[str] = field(default_factory=list)
    candidates: int = 0
    quantized: int = 0
    full_cosine: float | None = None  # every candidate quantized, before any exclusion
    trials: int = 0
    message: str = ""
    layout_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class AgreementRow:
    config: str  # the row's label (the precision spec, plus the graph when not the default)
    images: int
    tokens: int
    token_agreement: float
    exact_match_rate: float
    mean_first_divergence: float
    bytes: int
    precision: str = ""  # the precision spec FilaPipeline.from_artifacts takes for this row
    decoder: str = "auto"  # which decoder graph ("portable": the TensorRT Q/DQ variant)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationReport:
    artifacts: str
    method: str
    gate_cosine: float
    seed: int
    max_excluded: int
    split: dict
    stages: list[StageRow] = field(default_factory=list)
    decoder: list[StageRow] = field(default_factory=list)
    modular_chain: Metrics | None = None
    end_to_end: list[AgreementRow] = field(default_factory=list)
    fp32_bytes: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)  # task accuracy per precision (--questions)
    questions: str | None = None
    base: str = "fp32"  # the export's own precision, the reference of every row

    @property
    def validated(self) -> bool:
        return all(r.validated for r in [*self.stages, *self.decoder])

    def to_dict(self) -> dict:
        return {
            "artifacts": self.artifacts,
            "method": self.method,
            "gate_cosine": self.gate_cosine,
            "seed": self.seed,
            "max_excluded": self.max_excluded,
            "images": self.split,
            "stages": [r.to_dict() for r in self.stages],
            "decoder": [r.to_dict() for r in self.decoder],
            "modular_chain_int8": self.modular_chain.to_dict() if self.modular_chain else None,
            "end_to_end": [r.to_dict() for r in self.end_to_end],
            "fp32_bytes": self.fp32_bytes,
            "seconds": round(self.seconds, 1),
            "validated": self.validated,
            "messages": self.messages,
            "questions": self.questions,
            "answer_accuracy": self.answers,
        }

    def markdown(self) -> str:
        s = self.split
        lines = [
            f"# Calibration ({self.method}, gate cosine >= {self.gate_cosine})",
            "",
            f"{len(s['calibration_images'])} calibration image(s), {len(s['held_out_images'])} "
            f"held out (seed {self.seed}), {len(s['skipped'])} unreadable skipped; calibration set "
            f"sha256 {s['calibration_set_sha256'][:16]}...",
            "",
            "| stage | precision | cosine | SQNR (dB) | rel L2 | worst image cos | fp32 kept "
            "| size (MB) | result |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in [*self.stages, *self.decoder]:
            m = r.metrics
            kept = f"{len(r.excluded_layers)}/{r.candidates}" if r.candidates else "-"
            lines.append(
                f"| {r.stage} | {r.precision} | {m.cosine:.5f} | {m.sqnr_db:.1f} | {m.rel_l2:.2e} "
                f"| {m.min_image_cosine:.5f} | {kept} | {r.bytes / 1e6:.1f} "
                f"({self.base} {r.fp32_bytes / 1e6:.1f}) | {'pass' if r.validated else 'FAIL'} ({r.gate}) |"
            )
        if self.modular_chain:
            m = self.modular_chain
            lines += [
                "",
                f"Modular int8 chain end to end (convnext ... projector, errors "
                f"compounding) vs the fused fp32 graph: cosine {m.cosine:.5f}, SQNR "
                f"{m.sqnr_db:.1f} dB, rel L2 {m.rel_l2:.2e}",
            ]
        excluded = [(r.stage, r.excluded_layers) for r in self.stages if r.excluded_layers]
        if excluded:
            lines += ["", "Kept in fp32 by the sensitivity pass:"]
            lines += [f"- {stage}: {', '.join(names)}" for stage, names in excluded]
        if self.end_to_end:
            n = self.end_to_end[0]
            lines += [
                "",
                f"## Greedy agreement with the {self.base} pipeline ({n.images} held-out image(s), "
                f"{n.tokens} tokens each, EOS ignored)",
                "",
                "| precision | token agreement | exact match | mean first divergence | "
                "model size (MB) |",
                "|---|---|---|---|---|",
                f"| {self.base} | 1.000 | 1.000 | {n.tokens:.1f} | {self.fp32_bytes / 1e6:.1f} |",
            ]
            for r in self.end_to_end:
                lines.append(
                    f"| {r.config} | {r.token_agreement:.3f} | {r.exact_match_rate:.3f} "
                    f"| {r.mean_first_divergence:.1f} | {r.bytes / 1e6:.1f} "
                    f"({self.fp32_bytes / max(r.bytes, 1):.2f}x smaller) |"
                )
        if self.answers:
            lines += [
                "",
                f"## Task accuracy (exact match) on `{self.questions}`",
                "",
                f"| precision | exact match | boundary subset | same answer as {self.base} |",
                "|---|---|---|---|",
            ]
            for r in self.answers:
                boundary = (
                    "-" if r["boundary_accuracy"] is None else f"{r['boundary_accuracy']:.1%}"
                )
                lines.append(
                    f"| {r['config']} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | "
                    f"{boundary} ({r['n_boundary']}) | {r['same_as_fp32']}/{r['n']} |"
                )
        if self.messages:
            lines += ["", *[f"**{m}**" for m in self.messages]]
        lines += ["", f"**{'PASS' if self.validated else 'FAIL'}** ({self.seconds:.0f} s)"]
        return "\n".join(lines)

    def save(self, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        md, js = folder / f"{REPORT_NAME}.md", folder / f"{REPORT_NAME}.json"
        md.write_text(self.markdown() + "\n")
        js.write_text(json.dumps(self.to_dict(), indent=2))
        return [md, js]


def decoder_accuracy(reference_logits: list[np.ndarray], logits: list[np.ndarray]) -> Metrics:
    """Prefill logits of a decoder variant against the fp32 decoder's, pooled over images."""
    acc = MetricAccumulator()
    for a, b in zip(reference_logits, logits, strict=True):
        acc.add({"logits": a}, {"logits": b})
    return acc.result()
