"""A FILA checkpoint without ConvNeXt == transformers' LlavaNextForConditionalGeneration.

transformers' model is an independent implementation of tiling, feature selection, packing,
the merge at image-token positions and KV-cached generation; both load the same saved folder.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_checkpoint, random_image

from fila_export.model.checkpoint import load_checkpoint
from runtime.preprocess import preprocess
from runtime.prompt import PromptBuilder, expand_image_tokens

LOGITS_ATOL = 1e-4


def _inputs(model, prompts, image):
    pre = preprocess(image, model.preprocess_config)
    with torch.no_grad():
        feats = model.encode_image(pre)
    text = prompts.format("What is shown here?")
    ids = expand_image_tokens(
        prompts.encode(text), model.config.image_token_index, [feats.embeds.shape[0]]
    )
    hf_kwargs = {
        "pixel_values": torch.from_numpy(pre.pixel_values)[None],
        "image_sizes": torch.tensor([pre.image_size]),
    }
    return torch.tensor([ids]), feats, hf_kwargs


@pytest.fixture(scope="module", params=["llama", "qwen2-tied"])
def pair(request, tmp_path_factory):
    from transformers import LlavaNextForConditionalGeneration

    from fila_export.model.config import preset

    overrides = {"convnext": None}
    if request.param == "qwen2-tied":
        text = dict(preset("tiny").text, model_type="qwen2", tie_word_embeddings=True)
        overrides["text"] = text
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=5, **overrides)
    ours, _ = load_checkpoint(folder)
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    return ours, ref, PromptBuilder.from_folder(folder)


@pytest.mark.parametrize("size", [(90, 150), (150, 60), (200, 200), (30, 170)])
def test_same_logits(pair, size):
    ours, ref, prompts = pair
    input_ids, feats, hf_kwargs = _inputs(ours, prompts, random_image(*size, seed=size[0]))
    with torch.no_grad():
        ours_logits = ours(input_ids, [feats])
        ref_logits = ref(input_ids=input_ids, **hf_kwargs).logits
    assert ours_logits.shape == ref_logits.shape
    assert (ours_logits - ref_logits).abs().max().item() <= LOGITS_ATOL


def test_same_32_greedy_tokens(pair):
    ours, ref, prompts = pair
    input_ids, feats, hf_kwargs = _inputs(ours, prompts, random_image(120, 220, seed=5))
    mine = ours.generate(input_ids, [feats], max_new_tokens=32)[0].tolist()
    theirs = ref.generate(
        input_ids=input_ids,
        **hf_kwargs,
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
    )[0, input_ids.shape[1] :].tolist()
    mine_full = ours.generate(input_ids, [feats], max_new_tokens=32, eos_token_id=None)[0].tolist()
    assert len(set(mine_full)) > 4, "a random model that repeats one token makes a weak test"
    assert mine_full == theirs
    assert mine == theirs[: len(mine)]


def test_fila_branch_changes_features(tiny_checkpoint):
    """With ConvNeXt + CVFM the features differ from the ViT alone (the fusion is live)."""
    from fila_export.model import vision

    model, config = load_checkpoint(tiny_checkpoint)
    pre = preprocess(random_image(100, 180), model.preprocess_config)
    pv = torch.from_numpy(pre.pixel_values)
    with torch.no_grad():
        fused = vision.encode(
            model.vision_tower,
            model.convnext,
            model.cvfm,
            config,
            pv,
            torch.from_numpy(pre.global_view),
        )
        plain = vision.encode(model.vision_tower, None, None, config, pv, None)
    assert fused.shape == plain.shape
    assert (fused - plain).abs().max() > 1e-3
