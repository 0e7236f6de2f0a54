"""The ConvNeXt branch is timm's model; CVFM shapes and a hand-checked case."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.config import preset
from fila_export.model.cvfm import CVFMBlock, align_to_grid, tile_windows
from fila_export.model.vision import build_cvfm


def test_convnext_equals_timm_features_only(tiny_checkpoint, tmp_path):
    """timm's own ``features_only`` model, given our ConvNeXt weights through timm's pretrained-file
    path, gives the same four stage maps."""
    import timm
    from safetensors.torch import save_file

    model, config = load_checkpoint(tiny_checkpoint)
    weights = {k: v.contiguous() for k, v in model.convnext.state_dict().items()}
    conv = config.convnext
    head = timm.create_model(conv.arch, num_classes=0, depths=conv.depths, dims=conv.dims)
    full = {**{k: v for k, v in head.state_dict().items() if k.startswith("head.")}, **weights}
    save_file(full, str(tmp_path / "convnext.safetensors"))
    ref = timm.create_model(
        conv.arch,
        pretrained=True,
        features_only=True,
        num_classes=0,
        depths=conv.depths,
        dims=conv.dims,
        pretrained_cfg_overlay={"file": str(tmp_path / "convnext.safetensors")},
    ).eval()
    x = torch.randn(1, 3, 256, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.convnext.forward_intermediates(x, indices=4, intermediates_only=True)
        theirs = ref(x)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)


def test_tile_windows_row_major():
    # a 2x3 grid of 2x2 windows, each window filled with its tile number
    m = torch.arange(6.0).reshape(2, 3).repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    tiles = tile_windows(m, 2)
    assert tiles.shape == (6, 1, 2, 2)
    assert [t.unique().item() for t in tiles] == [0, 1, 2, 3, 4, 5]


def test_align_pools_exactly_and_interpolates_otherwise():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = align_to_grid(x, 2, exact=True)
    assert torch.equal(pooled[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    up = align_to_grid(torch.ones(1, 2, 3, 3), 4, exact=False)
    assert up.shape == (1, 2, 4, 4) and torch.allclose(up, torch.ones_like(up))


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)])
def test_cvfm_shapes_for_every_grid(grid):
    config = preset("tiny")
    blocks = build_cvfm(config)
    n = config.tokens_per_side
    tiles = 1 + grid[0] * grid[1]
    hidden = torch.randn(tiles, 1 + n * n, config.vision["hidden_size"])
    for block, dim, win in zip(blocks, config.convnext.dims, config.cvfm_windows(), strict=True):
        stage_map = torch.randn(1, dim, grid[0] * win, grid[1] * win)
        assert block.conv_tokens(stage_map).shape == (tiles, n * n, dim)
        assert block(hidden, stage_map).shape == hidden.shape


def test_cvfm_hand_checked_case():
    """D=2, C=1, one 1x2 grid of 2x2-token tiles, 4x4 windows; weights set by hand."""
    block = CVFMBlock(vit_dim=2, conv_dim=1, window=4, tokens_per_side=2, gate_init=0.5)
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
        block.norm.bias.fill_(0.0)  # LayerNorm over one channel -> 0: the conv value cancels
        block.fc1.weight.copy_(torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]]))
        block.fc1.bias.zero_()
        block.fc2.weight.copy_(torch.eye(2))
        block.fc2.bias.copy_(torch.tensor([0.5, -0.5]))
    stage_map = torch.arange(32.0).reshape(1, 1, 4, 8)
    hidden = torch.tensor([[[9.0, 9.0], [1.0, -1.0], [0.0, 2.0], [3.0, 0.0], [-2.0, 1.0]]]).repeat(
        3, 1, 1
    )
    out = block(hidden, stage_map)
    gelu = torch.nn.functional.gelu
    expected_patch = hidden[:, 1:] + torch.tanh(torch.tensor(0.5)) * (
        gelu(hidden[:, 1:]) + torch.tensor([0.5, -0.5])
    )
    assert torch.equal(out[:, :1], hidden[:, :1])  # CLS untouched
    assert torch.allclose(out[:, 1:], expected_patch, atol=1e-6)
    # tokens: base = the whole 4x8 map pooled to 2x2, then tile 0 and tile 1 windows pooled
    tokens = block.conv_tokens(stage_map)[..., 0]
    assert torch.equal(tokens[0], torch.tensor([5.5, 9.5, 21.5, 25.5]))
    assert torch.equal(tokens[1], torch.tensor([4.5, 6.5, 20.5, 22.5]))
    assert torch.equal(tokens[2], torch.tensor([8.5, 10.5, 24.5, 26.5]))


def test_zero_init_cvfm_is_identity():
    config = preset("tiny")
    block = build_cvfm(config)[0]
    block.zero_init()
    n = config.tokens_per_side
    hidden = torch.randn(3, 1 + n * n, config.vision["hidden_size"])
    win = config.cvfm_windows()[0]
    out = block(hidden, torch.randn(1, config.convnext.dims[0], win, 2 * win))
    assert torch.equal(out, hidden)


def test_no_convnext_config_builds_no_fusion():
    config = dataclasses.replace(preset("tiny"), convnext=None)
    from fila_export.model.fila import FilaForConditionalGeneration

    model = FilaForConditionalGeneration(config)
    assert model.convnext is None and model.cvfm is None
    assert not any(k.startswith(("convnext", "cvfm")) for k in model.state_dict())


def test_random_init_keeps_every_norm_and_layer_scale_near_one():
    """timm names the ConvNeXt stem / downsample norms ``stem.1`` / ``downsample.0``: they are found
    by type, so the random branch passes signal on instead of shrinking it ~50x per stage (which
    would leave the CVFM parity tests comparing near-zero features)."""
    from fila_export.model.fila import FilaForConditionalGeneration

    model = FilaForConditionalGeneration(preset("tiny"))
    model.init_weights(0)
    params = dict(model.named_parameters())
    for name in (
        "convnext.stem.1.weight",
        "convnext.stages.1.downsample.0.weight",
        "convnext.stages.0.blocks.0.gamma",
    ):
        assert abs(params[name].mean().item() - 1) < 0.1, name
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = model.convnext.forward_intermediates(x, indices=4, intermediates_only=True)
    assert all(m.std().item() > 0.3 for m in maps), [round(m.std().item(), 4) for m in maps]
