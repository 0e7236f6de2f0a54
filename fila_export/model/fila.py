"""The reference FILA model in PyTorch: ground truth for every parity test.

Module names follow transformers' LLaVA-NeXT checkpoint layout (``vision_tower``,
``multi_modal_projector``, ``image_newline``, ``language_model.model``, ``language_model.lm_head``)
plus ``convnext`` and ``cvfm``, so state-dict keys are the checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fila_export.model import vision
from fila_export.model.config import FilaConfig, preprocess_config
from runtime.errors import PromptError
from runtime.preprocess import NEWLINE, PreprocessedImage


def build_language_model(config: FilaConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(config.text)
    tcfg = AutoConfig.for_model(text.pop("model_type"), **text)
    tcfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(tcfg)


def norm_and_scale_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that scale activations rather than mix them: the affine of every
    normalisation layer (found by type, as timm names the ConvNeXt stem and downsample norms
    ``stem.1`` / ``downsample.0``) and layer-scale ``gamma`` vectors. Random init gives them ~1;
    a 0.02-scale value would shrink each stage's input ~50x and hide the branch in parity tests."""
    names = set()
    for prefix, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.endswith(
            "RMSNorm"
        )
        for pname, _ in module.named_parameters(recurse=False):
            if is_norm or pname == "gamma":
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names


@dataclass
class ImageFeatures:
    """One image's packed, projected features: rows become that image's tokens in the prompt."""

    embeds: torch.Tensor  # (num_image_tokens, text_dim)


class FilaForConditionalGeneration(nn.Module):
    """Hybrid encoder + projector + causal LM. Without ``convnext`` it is exactly LLaVA-NeXT."""

    def __init__(self, config: FilaConfig) -> None:
        super().__init__()
        self.config = config
        text_dim = config.text["hidden_size"]
        self.vision_tower = vision.build_vit(config)
        self.multi_modal_projector = vision.Projector(
            config.vision["hidden_size"], text_dim, config.projector_hidden_act
        )
        self.image_newline = nn.Parameter(torch.zeros(text_dim))
        self.language_model = build_language_model(config)
        if config.has_convnext:
            self.convnext = vision.build_convnext(config)
            self.cvfm = vision.build_cvfm(config)
        else:
            self.convnext = None
            self.cvfm = None
        self.preprocess_config = preprocess_config(config)

    # --- weights ------------------------------------------------------------------------
    def random_parameters(self, seed: int, gain: float = 1.0) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, deterministic random value) of every parameter, one at a time, so a checkpoint
        can be written without the model's memory (the model may live on the meta device).

        Matrices get std gain/sqrt(fan_in) so activations stay O(1) at any size and a random LLM
        gives varied greedy tokens (parity tests then compare real sequences, not one repeated id).
        """
        gen = torch.Generator().manual_seed(seed)
        scales = norm_and_scale_parameters(self)
        for name, p in self.named_parameters():
            if name in scales:
                base = 0.0 if name.endswith("bias") else 1.0
                value = base + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".gate"):
                value = torch.full(p.shape, float(self.config.cvfm_gate_init))
            elif p.ndim >= 2:
                value = gain / p.shape[1:].numel() ** 0.5 * torch.randn(p.shape, generator=gen)
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen)
            yield name, value

    def init_weights(self, seed: int, gain: float = 1.0, zero_init_cvfm: bool = False) -> None:
        """Deterministic random weights (for tests and ``fila init``); every tensor is touched."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self.random_parameters(seed, gain):
                params[name].copy_(value)
            if zero_init_cvfm and self.cvfm is not None:
                for block in self.cvfm:
                    block.zero_init()
        self.language_model.tie_weights()

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.text.get("tie_word_embeddings", False))

    # --- vision -------------------------------------------------------------------------
    def encode_image(self, image: PreprocessedImage) -> ImageFeatures:
        """Preprocessed image -> packed, projected features with image_newline rows."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixel_values = torch.from_numpy(image.pixel_values).to(dtype)
        global_view = None
        if self.convnext is not None:
            global_view = torch.from_numpy(image.global_view).to(dtype)
        feats = vision.encode(
            self.vision_tower, self.convnext, self.cvfm, self.config, pixel_values, global_view
        )
        projected = self.multi_modal_projector(feats)
        return ImageFeatures(self.pack(projected, image))

    def pack(self, projected: torch.Tensor, image: PreprocessedImage) -> torch.Tensor:
        """Unpad + image_newline, by the image's packing index (the runtime's, one rule)."""
        rows = torch.cat([projected.reshape(-1, projected.shape[-1]), self.image_newline[None]])
        index = np.where(image.token_index == NEWLINE, rows.shape[0] - 1, image.token_index)
        return rows[torch.from_numpy(index)]

    # --- text ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, images: Sequence[ImageFeatures]) -> torch.Tensor:
        """Token embeddings with image features written at the image-token positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_index
        if not images:
            if mask.any():
                raise PromptError("prompt has image tokens but no image was given")
            return embeds
        feats = torch.cat([f.embeds for f in images]).to(embeds.dtype)
        if int(mask.sum()) != feats.shape[0]:
            raise PromptError(
                f"prompt has {int(mask.sum())} image tokens but the images give {feats.shape[0]} "
                "features; expand each image placeholder with expand_image_tokens"
            )
        embeds = embeds.clone()
        embeds[mask] = feats
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence[ImageFeatures] = (),
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position (B, S, vocab)."""
        embeds = self.embed(input_ids, images)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: Sequence[ImageFeatures] = (),
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens): transformers' KV-cached generate on the LLM.
        ``min_new_tokens`` holds EOS back (benchmarks time a fixed answer length)."""
        from transformers import GenerationConfig

        if seed is not None:
            torch.manual_seed(seed)
        embeds = self.embed(input_ids, images)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else 0,
        )
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, generation_config=gen
        )
