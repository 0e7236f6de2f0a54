"""The ``demo`` config: a FILA small enough to train on two CPU cores in half an hour.

Tiles of 56 px with 14 px patches (4 x 4 tokens per tile, at most 88 image tokens for the 2 x 2
grid), a 5-layer ViT of width 128 (the projector reads layer 4), a 4-stage ConvNeXt of widths
32-128 that sees each tile at 64 px, and a 2-layer Llama of width 128 over the demo tokenizer's
300-token byte-level BPE, whose answers to the reading task are one token per character. About
2.2 M parameters: 8.8 MB as fp32 safetensors.
"""

from __future__ import annotations

from fila_export.demo.data import DEFAULT_PINPOINTS, DEFAULT_TILE
from fila_export.model.config import ConvNextConfig, FilaConfig

DEMO_VOCAB = 300  # byte-level BPE: 256 bytes + 4 specials + 40 merges (digits stay single tokens)
DEMO_MAX_POSITIONS = 256  # <= 88 image tokens (2 x 2 grid) + a two-question chat


def demo_config(convnext: bool = True, vocab_size: int = DEMO_VOCAB) -> FilaConfig:
    """The demo FILA; ``convnext=False`` gives the plain LLaVA-NeXT ablation (same ViT and LLM)."""
    tile = DEFAULT_TILE
    vision = {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "image_size": tile,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 128,
    }
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": DEMO_MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    return FilaConfig(
        vision=vision,
        text=text,
        convnext=ConvNextConfig(depths=[1, 1, 2, 1], dims=[32, 64, 96, 128]) if convnext else None,
        interaction_layers=[1, 2, 3, 4],
        image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS],
        global_view_scale=64 / tile,  # each 56 px tile is 64 px (2 stride-32 cells) for ConvNeXt
    )


def init_demo_weights(model, seed: int, layer_scale: float = 1.0) -> None:
    """``init_weights(seed, zero_init_cvfm=True)``, then the ConvNeXt's LayerNorms made the exact
    identity affine and its layer-scale ``gamma`` a constant ``layer_scale`` (``init_weights``
    gives both 1 + 0.1 noise): a clean start for training from scratch, and the recipe the shipped
    demo checkpoint was trained from (the random stream is the same, so it still reproduces).
    """
    import torch

    model.init_weights(seed, zero_init_cvfm=True)
    if model.convnext is None:
        return
    with torch.no_grad():
        for module in model.convnext.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, p in model.convnext.named_parameters():
            if name.endswith("gamma"):
                p.fill_(layer_scale)
