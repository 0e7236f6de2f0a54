"""End-to-end PyTorch reference: checkpoint folder + image + prompt -> answer.

It uses the runtime's own image loading, preprocessing and prompt building, so the only thing a
parity test compares is the model math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.fila import FilaForConditionalGeneration, ImageFeatures
from runtime.image_io import load_image
from runtime.preprocess import PreprocessedImage, preprocess
from runtime.prompt import PromptBuilder


@dataclass
class ReferenceResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]  # before image-token expansion
    input_ids: list[int] = field(repr=False)  # after expansion: what the LLM sees


class ReferencePipeline:
    """The PyTorch model with the runtime's preprocessing and prompts."""

    def __init__(self, model: FilaForConditionalGeneration, prompts: PromptBuilder) -> None:
        self.model = model
        self.prompts = prompts

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> ReferencePipeline:
        model, _ = load_checkpoint(folder)
        return cls(model, PromptBuilder.from_folder(folder))

    def preprocess(self, images: Sequence) -> list[PreprocessedImage]:
        return [preprocess(load_image(im), self.model.preprocess_config) for im in images]

    def encode_images(self, images: Sequence[PreprocessedImage]) -> list[ImageFeatures]:
        with torch.no_grad():
            return [self.model.encode_image(im) for im in images]

    def prepare(self, images: Sequence, prompt: str, raw_prompt: bool = False):
        """(prompt ids, expanded ids, image features) for one request, ids built by the runtime's
        ``PromptBuilder.request_ids`` (the same ids the torch-free pipeline feeds)."""
        loaded = self.preprocess(images)
        prompt_ids, ids = self.prompts.request_ids(
            prompt, [im.num_tokens for im in loaded], raw=raw_prompt
        )
        return prompt_ids, ids, self.encode_images(loaded)

    def generate(
        self,
        images: Sequence,
        prompt: str,
        max_new_tokens: int = 32,
        raw_prompt: bool = False,
        **sampling,
    ) -> ReferenceResult:
        prompt_ids, ids, feats = self.prepare(images, prompt, raw_prompt)
        out = self.model.generate(
            torch.tensor([ids]),
            feats,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.prompts.eos_token_ids or None,
            **sampling,
        )
        new = out[0].tolist()
        eos = set(self.prompts.eos_token_ids)
        if eos and new and new[-1] in eos:
            new = new[:-1]
        return ReferenceResult(self.prompts.decode(new), new, prompt_ids, ids)
