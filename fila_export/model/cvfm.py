"""CVFM: the ConvNeXt-ViT deep fusion block, applied after one ViT interaction layer.

Design (see seeds/README.md): ConvNeXt stage i's map over the whole canvas is cut into one window
per tile (row-major, the tiles' order), the whole map is pooled for the base thumbnail, both are
aligned to the ViT token grid, LayerNorm'd, concatenated with the ViT patch tokens, projected back
to the ViT width and added through a tanh gate. The CLS token is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def align_to_grid(maps: torch.Tensor, n: int, exact: bool) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, n, n): mean pooling when h, w are multiples of n, else bilinear."""
    if exact:
        b, c, h, w = maps.shape
        return maps.reshape(b, c, n, h // n, n, w // n).mean(dim=(3, 5))
    return F.interpolate(maps, size=(n, n), mode="bilinear", align_corners=False)


def tile_windows(stage_map: torch.Tensor, window: int) -> torch.Tensor:
    """(1, C, rows*window, cols*window) -> (rows*cols, C, window, window), tiles row-major."""
    _, c, h, w = stage_map.shape
    rows, cols = h // window, w // window
    x = stage_map[0].reshape(c, rows, window, cols, window)
    return x.permute(1, 3, 0, 2, 4).reshape(rows * cols, c, window, window)


class CVFMBlock(nn.Module):
    """Fuses one ConvNeXt stage into the ViT tokens of every tile (base thumbnail first)."""

    def __init__(
        self, vit_dim: int, conv_dim: int, window: int, tokens_per_side: int, gate_init: float = 1.0
    ) -> None:
        super().__init__()
        self.window = window
        self.tokens_per_side = tokens_per_side
        self.norm = nn.LayerNorm(conv_dim)
        self.fc1 = nn.Linear(vit_dim + conv_dim, vit_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(vit_dim, vit_dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def zero_init(self) -> None:
        """Start as the identity (for training from scratch): the last projection is zero."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def conv_tokens(self, stage_map: torch.Tensor) -> torch.Tensor:
        """(1, C, H, W) ConvNeXt map -> (1 + tiles, n*n, C) tokens aligned to each tile's grid."""
        n, win = self.tokens_per_side, self.window
        tiles = align_to_grid(tile_windows(stage_map, win), n, exact=win % n == 0)
        # The whole map is rows*win x cols*win, so it pools exactly whenever the windows do.
        base = align_to_grid(stage_map, n, exact=win % n == 0)
        return torch.cat([base, tiles], dim=0).flatten(2).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, stage_map: torch.Tensor) -> torch.Tensor:
        """hidden: (tiles, 1 + n*n, D) ViT states; stage_map: (1, C, H, W). Returns new states."""
        conv = self.norm(self.conv_tokens(stage_map))
        patches = hidden[:, 1:]
        fused = self.fc2(self.act(self.fc1(torch.cat([patches, conv], dim=-1))))
        return torch.cat([hidden[:, :1], patches + torch.tanh(self.gate) * fused], dim=1)
