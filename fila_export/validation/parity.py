"""Parity of an export against the PyTorch reference, stage by stage and end to end.

Every stage is fed the same inputs in PyTorch and in the backend (inputs come from running the
reference on real images, so each stage sees the activations it will really see), every output is
compared (``runtime.compare``), then greedy generation is compared token by token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fila_export.demo import PHOTOS
from fila_export.export.modules import DecoderStage, TorchStages
from fila_export.export.stages import stage_specs, vision_chain
from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.reference import ReferencePipeline
from runtime.compare import token_agreement
from runtime.generate import DecoderShape
from runtime.image_io import find_images
from runtime.manifest import Manifest
from runtime.parity import PROMPT, StageChecker, ValidationReport
from runtime.pipeline import FilaPipeline
from runtime.preprocess import PreprocessedImage
from runtime.prompt import PromptBuilder
from runtime.vision import image_feeds, walk_chain


def stage_feeds(
    stages: TorchStages, image: PreprocessedImage, ids: list[int], window: int | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs of every stage for one image and prompt, produced by the PyTorch reference: the
    vision chain walked stage by stage, the prompt's embeddings, a decode step after a prefill
    (of the whole prompt, or of its last ``window`` positions: a recorded bundle stays small)."""
    model = stages.model
    pixels = {k: torch.from_numpy(v) for k, v in image_feeds(image).items()}
    feeds: dict[str, dict] = {"vision": pixels}
    chain = [stages.specs[n] for n in vision_chain(model.config)]
    walk_chain(chain, stages, pixels, record=feeds)
    input_ids = torch.tensor([ids])
    feeds["embed"] = {"input_ids": input_ids}
    with torch.no_grad():
        embeds = model.embed(input_ids, [model.encode_image(image)])
    feeds["decoder"] = decoder_feeds(model, embeds[:, -window:] if window else embeds)
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


def reference_side(
    artifacts: str | Path, checkpoint: str | Path, images: str | Path | None, max_images: int
) -> tuple[Manifest, list[Path], ReferencePipeline, TorchStages]:
    """The export's manifest, the images to check, and the PyTorch pipeline and stages."""
    manifest = Manifest.load(artifacts)
    model, _ = load_checkpoint(checkpoint)
    paths = find_images(images or PHOTOS)[:max_images]
    ref = ReferencePipeline(model, PromptBuilder.from_folder(checkpoint))
    return manifest, paths, ref, TorchStages(model, stage_specs(model.config))


def validate(
    artifacts: str | Path,
    checkpoint: str | Path,
    images: str | Path | None = None,
    backend: str = "onnxruntime",
    precision: str | None = None,
    tokens: int = 32,
    max_images: int = 3,
) -> ValidationReport:
    manifest, paths, ref, stages = reference_side(artifacts, checkpoint, images, max_images)
    checker = StageChecker(manifest, backend, precision)
    report = ValidationReport(backend, checker.spec.text, images=[str(p) for p in paths])
    with checker:
        for i, path in enumerate(paths):
            image = ref.preprocess([path])[0]
            _, ids = ref.prompts.request_ids(PROMPT, [image.num_tokens])
            for name, feeds in stage_feeds(stages, image, ids).items():
                if checker.variant(name) is not None:
                    checker.check(name, feeds, stages(name, feeds), last=i == len(paths) - 1)
    report.stages = checker.stage_results()
    want = [ref.generate([p], PROMPT, max_new_tokens=tokens).token_ids for p in paths]
    with FilaPipeline.from_artifacts(artifacts, backend=backend, precision=precision) as pipe:
        got = [pipe.generate(p, PROMPT, max_new_tokens=tokens).token_ids for p in paths]
    agreement = token_agreement(want, got)
    report.tokens_compared, report.tokens_equal = agreement.compared, agreement.equal
    report.first_divergence = agreement.first_divergence
    return report
