"""FilaConfig: presets, JSON round trip, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fila_export.model.config import FilaConfig, preset
from fila_export.model.fila import FilaForConditionalGeneration
from runtime.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "small", "edge", "paper"])
def test_json_round_trips(name):
    config = preset(name)
    assert FilaConfig.from_json(config.to_json()) == config
    assert FilaConfig.from_hf_dict(config.to_hf_dict(), config.preprocessor_dict()) == config


def _param_count(config: FilaConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in FilaForConditionalGeneration(config).parameters())


def test_preset_sizes():
    assert _param_count(preset("tiny")) < 1_000_000
    small = preset("small")
    assert 0.2e9 <= _param_count(small) <= 0.4e9
    assert small.tile_size == 336 and small.vocab_size == 32000
    paper = preset("paper")  # shapes only: built on the meta device, never materialised
    assert paper.vision["hidden_size"] == 1024 and paper.vision["num_hidden_layers"] == 24
    assert paper.convnext.dims == [192, 384, 768, 1536]
    assert 6.5e9 < _param_count(paper) < 8e9
    edge = preset("edge")
    assert edge.text["model_type"] == "qwen2" and edge.convnext.dims == [128, 256, 512, 1024]
    assert edge.text["tie_word_embeddings"] and edge.vocab_size == 151936
    assert 1.9e9 < _param_count(edge) < 2.3e9


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interaction_layers": [1, 2, 3]}, "four ConvNeXt stages"),
        ({"interaction_layers": [1, 2, 3, 9]}, "must be increasing"),
        ({"image_grid_pinpoints": [[50, 112]]}, "multiples of the tile size"),
        ({"image_token_index": 99999}, "outside the vocabulary"),
        ({"global_view_scale": 1.3}, "whole multiple of ConvNeXt's stride"),
        ({"vision_feature_layer": [-2, -1]}, "one integer"),
    ],
)
def test_validation_names_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(preset("tiny"), **change)


def test_unknown_field():
    data = preset("tiny").to_dict() | {"bogus": 1}
    with pytest.raises(ConfigError, match="unknown FilaConfig fields"):
        FilaConfig.from_dict(data)
