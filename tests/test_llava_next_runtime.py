"""A LLaVA-NeXT checkpoint saved by transformers, exported and run with `fila run`, generates
transformers' own greedy tokens (transformers' processor, model and generate as the reference)."""

from __future__ import annotations

import json

import torch
from conftest import random_image, run_fila

from fila_export.model.config import preset
from fila_export.model.tokenizer import write_tokenizer


def test_transformers_saved_llava_next_runs_like_transformers(tmp_path):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tiny = preset("tiny")
    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **tiny.vision},
        text_config=tiny.text,
        image_grid_pinpoints=tiny.image_grid_pinpoints,
        image_token_index=tiny.image_token_index,
    )
    torch.manual_seed(2)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # varied weights, so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[1:].numel() ** -0.5)
    ckpt = tmp_path / "llava"
    model.save_pretrained(ckpt)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=tiny.image_grid_pinpoints,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    processor.save_pretrained(ckpt)
    write_tokenizer(ckpt, 512, 4096)

    art = tmp_path / "art"
    r = run_fila("export", "--checkpoint", str(ckpt), "--out", str(art))
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "manifest.json").read_text())["preprocess"]["image_mean"] == [
        0.5,
        0.4,
        0.3,
    ]
    image_path = tmp_path / "im.png"
    image = random_image(100, 170, seed=4)
    image.save(image_path)
    r = run_fila(
        "run",
        "--artifacts",
        str(art),
        "--image",
        str(image_path),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "32",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout.strip().splitlines()[-1])

    inputs = processor(image, return_tensors="pt")
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    class _Shim:  # the count transformers' processor inserts for this image
        image_processor = processor
        patch_size = 14
        num_additional_image_tokens = 0
        _get_unpadded_features = LlavaNextProcessor._get_unpadded_features

    h, w = inputs["image_sizes"][0].tolist()
    n = LlavaNextProcessor._get_number_of_features(_Shim(), h, w, 56, 56)
    ids = []
    for t in ours["prompt_token_ids"]:
        ids += [t] * (n if t == tiny.image_token_index else 1)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    theirs = out[0, input_ids.shape[1] :].tolist()
    theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
    assert len(set(theirs)) > 3
    assert ours["token_ids"] == theirs
