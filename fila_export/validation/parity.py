"""Parity of an export against the PyTorch reference, stage by stage and end to end.

Every stage is fed the same inputs in PyTorch and in the backend (inputs come from running the
reference on real images, so each stage sees the activations it will really see), every output is
compared (``runtime.compare``), then greedy generation is compared token by token.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fila_export.demo import PHOTOS
from fila_export.export.modules import DecoderStage, TorchStages
from fila_export.export.stages import stage_specs, vision_chain
from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.reference import ReferencePipeline
from runtime.backends import load_runner
from runtime.compare import TOLERANCES, Comparison, compare, token_agreement, tolerance
from runtime.generate import DecoderShape
from runtime.image_io import find_images
from runtime.manifest import Manifest
from runtime.pipeline import FilaPipeline
from runtime.preprocess import PreprocessedImage
from runtime.prompt import PromptBuilder
from runtime.variants import precision_spec
from runtime.vision import image_feeds, walk_chain

PROMPT = "Describe the image."


@dataclass
class StageResult:
    stage: str
    precision: str
    max_abs: float
    rel_l2: float
    cosine: float
    tolerance: float
    passed: bool


@dataclass
class ValidationReport:
    backend: str
    precision: str = "fp32"
    stages: list[StageResult] = field(default_factory=list)
    tokens_compared: int = 0
    tokens_equal: int = 0
    first_divergence: int | None = None
    images: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        # Exact greedy agreement is required of fp32; lower precisions report it (their accuracy
        # gate is the per-stage tolerance and the calibration report).
        exact = self.first_divergence is None or self.precision != "fp32"
        return all(s.passed for s in self.stages) and exact

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed, "tolerances_rel_l2": TOLERANCES}

    def markdown(self) -> str:
        lines = [
            f"# Validation ({self.backend}) on {len(self.images)} image(s)",
            "",
            "| stage | precision | max abs | rel L2 | cosine | tolerance (rel L2) | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            lines.append(
                f"| {s.stage} | {s.precision} | {s.max_abs:.2e} | {s.rel_l2:.2e} | "
                f"{s.cosine:.6f} | {s.tolerance:.0e} | {'pass' if s.passed else 'FAIL'} |"
            )
        div = "none" if self.first_divergence is None else str(self.first_divergence)
        lines += [
            "",
            f"Greedy tokens: {self.tokens_equal}/{self.tokens_compared} equal, "
            f"first divergence: {div}",
            "",
            f"**{'PASS' if self.passed else 'FAIL'}**",
        ]
        return "\n".join(lines)


def stage_feeds(
    stages: TorchStages, image: PreprocessedImage, ids: list[int]
) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs of every stage for one image and prompt, produced by the PyTorch reference: the
    vision chain walked stage by stage, the prompt's embeddings, a decode step after a prefill."""
    model = stages.model
    pixels = {k: torch.from_numpy(v) for k, v in image_feeds(image).items()}
    feeds: dict[str, dict] = {"vision": pixels}
    chain = [stages.specs[n] for n in vision_chain(model.config)]
    walk_chain(chain, stages, pixels, record=feeds)
    input_ids = torch.tensor([ids])
    feeds["embed"] = {"input_ids": input_ids}
    with torch.no_grad():
        embeds = model.embed(input_ids, [model.encode_image(image)])
    feeds["decoder"] = decoder_feeds(model, embeds)
    feeds["decoder_gqa"] = gqa_decoder_feeds(feeds["decoder"])
    return feeds


def decoder_feeds(model, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """A decode step after a real prefill: past from the prompt, one new position."""
    shape = DecoderShape.from_text_config(model.config.text)
    seq = embeds.shape[1]
    empty = [torch.zeros(0, 1, shape.kv_heads, shape.head_dim) for _ in range(2 * shape.num_layers)]
    with torch.no_grad():
        out = DecoderStage(model).eval()(
            embeds[:, :-1],
            torch.ones(1, seq - 1, dtype=torch.long),
            torch.arange(seq - 1)[None],
            *empty,
        )
    feeds = {
        "inputs_embeds": embeds[:, -1:],
        "attention_mask": torch.ones(1, seq, dtype=torch.long),
        "position_ids": torch.tensor([[seq - 1]]),
    }
    for i in range(shape.num_layers):
        feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = out[1 + 2 * i], out[2 + 2 * i]
    return feeds


def gqa_decoder_feeds(portable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same decode step for ``decoder_gqa``: the prefix in a head-major buffer with room for
    the new position (the graph writes it there)."""
    total = portable["attention_mask"].shape[1]
    feeds = {
        "inputs_embeds": portable["inputs_embeds"],
        "position_ids": portable["position_ids"],
        "seqlens_k": torch.tensor([total - 1], dtype=torch.int32),
        "total_sequence_length": torch.tensor(total, dtype=torch.int32),
    }
    for name, past in portable.items():
        if name.startswith("past."):
            buffer = torch.zeros(past.shape[1], past.shape[2], total, past.shape[3])
            buffer[:, :, : past.shape[0]] = past.permute(1, 2, 0, 3)
            feeds[name] = buffer
    return feeds


def worst_output(want: dict, got: dict) -> Comparison:
    """The output of a stage furthest from the reference (by relative L2)."""
    results = [compare(np.asarray(want[name]), got[name]) for name in want]
    return max(results, key=lambda c: c.rel_l2)


class StageChecker:
    """Runs each stage of an export on the reference's feeds and keeps its worst comparison."""

    def __init__(self, manifest: Manifest, backend: str, precision: str, **options) -> None:
        self.manifest, self.backend, self.options = manifest, backend, options
        self.spec = precision_spec(manifest, precision)
        self.runners: dict[tuple[str, str], object] = {}
        self.results: dict[tuple[str, str], list[Comparison]] = {}
        self.engines = None
        if backend == "tensorrt":  # only what was built can be checked
            from runtime.backends.tensorrt.loader import built_engines

            self.engines = built_engines(manifest)

    def variant(self, name: str) -> str | None:
        """The variant to check, or None when the stage is not exported, not this backend's, or
        (TensorRT) not built."""
        if name not in self.manifest.stages or not self.manifest.spec(name).runs_on(self.backend):
            return None
        variant = self.spec.variant(name, self.manifest.variants_for(name, self.backend))
        if self.engines is not None and (name, variant) not in self.engines:
            return None
        return variant

    def check(self, name: str, feeds: dict, want: dict) -> None:
        variant = self.variant(name)
        if variant is None:
            return
        key = (name, variant)
        if key not in self.runners:
            self.runners[key] = load_runner(
                self.backend, self.manifest, name, variant, **self.options
            )
        got = self.runners[key].infer({k: v.numpy() for k, v in feeds.items()})
        self.results.setdefault(key, []).append(worst_output(want, got))

    def stage_results(self) -> list[StageResult]:
        out = []
        for (name, variant), results in self.results.items():
            worst = max(results, key=lambda c: c.rel_l2)
            tol = tolerance(variant)
            out.append(
                StageResult(name, variant, *asdict(worst).values(), tol, worst.rel_l2 <= tol)
            )
        return out

    def close(self) -> None:
        """Free every stage session before a pipeline loads its own (peak memory)."""
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        gc.collect()


def validate(
    artifacts: str | Path,
    checkpoint: str | Path,
    images: str | Path | None = None,
    backend: str = "onnxruntime",
    precision: str | None = None,
    tokens: int = 32,
    max_images: int = 3,
) -> ValidationReport:
    manifest = Manifest.load(artifacts)
    model, _ = load_checkpoint(checkpoint)
    paths = find_images(images or PHOTOS)[:max_images]
    ref = ReferencePipeline(model, PromptBuilder.from_folder(checkpoint))
    checker = StageChecker(manifest, backend, precision)
    report = ValidationReport(backend, checker.spec.text, images=[str(p) for p in paths])
    stages = TorchStages(model, stage_specs(model.config))
    for path in paths:
        image = ref.preprocess([path])[0]
        _, ids = ref.prompts.request_ids(PROMPT, [image.num_tokens])
        for name, feeds in stage_feeds(stages, image, ids).items():
            if checker.variant(name) is not None:
                checker.check(name, feeds, stages(name, feeds))
    report.stages = checker.stage_results()
    checker.close()
    pipe = FilaPipeline.from_artifacts(artifacts, backend=backend, precision=precision)
    want = [ref.generate([p], PROMPT, max_new_tokens=tokens).token_ids for p in paths]
    got = [pipe.generate(p, PROMPT, max_new_tokens=tokens).token_ids for p in paths]
    pipe.close()
    agreement = token_agreement(want, got)
    report.tokens_compared, report.tokens_equal = agreement.compared, agreement.equal
    report.first_divergence = agreement.first_divergence
    return report


def write_json(report: ValidationReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2))
