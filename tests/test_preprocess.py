"""runtime/preprocess.py against transformers' LlavaNextImageProcessor (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image

from fila_export.model.config import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_NEXT_PINPOINTS,
    preprocess_config,
    preset,
)
from runtime.preprocess import (
    NEWLINE,
    PreprocessConfig,
    num_image_tokens,
    packing_index,
    preprocess,
    select_best_resolution,
)

SIZES = [
    (1, 1),
    (1, 4000),
    (4000, 1),
    (2, 3),
    (13, 7),
    (336, 336),
    (337, 335),
    (336, 672),
    (672, 336),
    (500, 501),
    (333, 999),
    (999, 333),
    (1008, 336),
    (100, 2000),
    (2000, 100),
    (719, 1279),
    (1080, 1920),
    (480, 640),
    (641, 479),
    (1500, 1501),
    (57, 1023),
    (3, 5000),
]


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


CFG = PreprocessConfig(336, 14, tuple(map(tuple, LLAVA_NEXT_PINPOINTS)), CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_pixel_identical_to_transformers(hf_processor, size):
    image = random_image(*size, seed=size[0] * 7 + size[1])
    ref = hf_processor(image, return_tensors="np")
    ours = preprocess(image, CFG)
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref["pixel_values"][0].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"][0]).max() <= 1e-6
    assert tuple(ref["image_sizes"][0]) == ours.image_size


def test_real_images_identical(hf_processor, real_images):
    for name, image in real_images.items():
        ref = hf_processor(image, return_tensors="np")["pixel_values"][0]
        ours = preprocess(image, CFG).pixel_values
        assert np.abs(ours - ref).max() <= 1e-6, name


def test_best_resolution_examples():
    pins = LLAVA_NEXT_PINPOINTS
    assert select_best_resolution((100, 1000), pins) == (336, 1008)
    assert select_best_resolution((1000, 100), pins) == (1008, 336)
    assert select_best_resolution((900, 900), pins) == (672, 672)
    assert select_best_resolution((1, 1), pins) == (336, 672)


def test_global_view_matches_canvas():
    cfg = preprocess_config(preset("tiny"))
    out = preprocess(random_image(90, 200), cfg)
    rows, cols = out.grid
    assert out.pixel_values.shape[0] == 1 + rows * cols
    assert out.global_view.shape == (1, 3, rows * 128, cols * 128)
    # the padding bands are black (0 before normalization) on both views
    black = (0 - np.asarray(cfg.global_mean)) / np.asarray(cfg.global_std)
    np.testing.assert_allclose(out.global_view[0, :, 0, 0], black, rtol=1e-6)


def test_packing_index_counts_and_newlines():
    # a 2x2 grid of 4x4 tokens, image as wide as tall: nothing unpadded, 8 rows + newline each
    idx = packing_index((100, 100), (2, 2), 4)
    assert idx.shape[0] == 16 + 8 * 9
    assert (idx == NEWLINE).sum() == 8
    assert sorted(idx[idx != NEWLINE].tolist()) == list(range(16 * 5))
    # a wide image in a square grid: top and bottom rows are padding and are dropped
    wide = packing_index((50, 100), (2, 2), 4)
    assert (wide == NEWLINE).sum() == 4


def test_num_image_tokens_matches_transformers_processor_count():
    """Our packing length equals the placeholder count transformers' processor would insert."""
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
        patch_size=14,
        num_additional_image_tokens=0,
    )
    fake._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(fake, *a)
    for h, w in SIZES:
        n_tiles = image_size_to_num_patches((h, w), LLAVA_NEXT_PINPOINTS, 336)
        assert n_tiles == preprocess(random_image(h, w), CFG).pixel_values.shape[0]
        expected = LlavaNextProcessor._get_number_of_features(fake, h, w, 336, 336)
        assert num_image_tokens((h, w), CFG) == expected, (h, w)
