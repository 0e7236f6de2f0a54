"""The hybrid encoder: CLIP ViT on tiles, ConvNeXt on the global view, CVFM between ViT segments.

The ViT is run as segments split at the interaction layers, so each segment and each CVFM block
can also be exported and timed alone (the stage graphs); ``encode`` chains them for one image.
"""

from __future__ import annotations

import torch
from torch import nn

from fila_export.model.config import FilaConfig
from fila_export.model.cvfm import CVFMBlock


def build_vit(config: FilaConfig) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vcfg = CLIPVisionConfig(**config.vision)
    vcfg._attn_implementation = "sdpa"
    return CLIPVisionModel(vcfg)


def build_convnext(config: FilaConfig) -> nn.Module:
    """A timm ConvNeXt whose stage outputs feed CVFM; the classifier head is pruned."""
    import timm

    conv = config.convnext
    model = timm.create_model(
        conv.arch, pretrained=False, num_classes=0, depths=tuple(conv.depths), dims=tuple(conv.dims)
    )
    model.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
    return model


class Projector(nn.Module):
    """LLaVA's ``mlp2x_gelu``: ViT width -> LLM width."""

    def __init__(self, vit_dim: int, text_dim: int, act: str = "gelu") -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vit_dim, text_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def build_cvfm(config: FilaConfig) -> nn.ModuleList:
    vit_dim = config.vision["hidden_size"]
    return nn.ModuleList(
        CVFMBlock(vit_dim, dim, win, config.tokens_per_side, config.cvfm_gate_init)
        for dim, win in zip(config.convnext.dims, config.cvfm_windows(), strict=True)
    )


def run_vit_layers(vit: nn.Module, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    for layer in vit.encoder.layers[start:end]:
        hidden = layer(hidden, None)
    return hidden


def vit_embed(vit: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch + position embeddings and CLIP's pre-LayerNorm: the input of ViT layer 1."""
    return vit.pre_layrnorm(vit.embeddings(pixel_values))


def convnext_maps(convnext: nn.Module, global_view: torch.Tensor) -> list[torch.Tensor]:
    """The four stage maps of the global high-resolution view."""
    return convnext.forward_intermediates(global_view, indices=4, intermediates_only=True)


def select_features(hidden: torch.Tensor, strategy: str) -> torch.Tensor:
    """LLaVA's feature selection: drop CLS for ``default``."""
    return hidden[:, 1:] if strategy == "default" else hidden


def encode(
    vit: nn.Module,
    convnext: nn.Module | None,
    cvfm: nn.ModuleList | None,
    config: FilaConfig,
    pixel_values: torch.Tensor,
    global_view: torch.Tensor | None,
) -> torch.Tensor:
    """One image's tiles (N, 3, T, T) [+ global view] -> ViT features (N, P, D), unprojected."""
    hidden = vit_embed(vit, pixel_values)
    segments = config.vit_segments()
    maps = convnext_maps(convnext, global_view) if convnext is not None else []
    for k, (start, end) in enumerate(segments):
        hidden = run_vit_layers(vit, hidden, start, end)
        if k < len(maps):
            hidden = cvfm[k](hidden, maps[k])
    return select_features(hidden, config.vision_feature_select_strategy)
