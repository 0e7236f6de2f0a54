"""The demo reading task, its config and its training loop (issue 8), fast on CPU."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fila_export.demo import data
from fila_export.demo import train as T
from fila_export.demo.model import demo_config, init_demo_weights
from fila_export.model.config import preprocess_config
from fila_export.model.fila import FilaForConditionalGeneration
from runtime.preprocess import fitted_size, num_image_tokens, select_best_resolution

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pixels(sample: data.Sample) -> np.ndarray:
    return np.asarray(sample.image)


# --- data --------------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed():
    a = list(data.generate(7, 6, boundary_share=0.5))
    b = list(data.generate(7, 6, boundary_share=0.5))
    c = list(data.generate(8, 6, boundary_share=0.5))
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answer, x.meta) == (y.question, y.answer, y.meta)
        assert np.array_equal(_pixels(x), _pixels(y))
    assert any(not np.array_equal(_pixels(x), _pixels(z)) for x, z in zip(a, c, strict=True))
    # A sample does not depend on the ones before it.
    assert np.array_equal(_pixels(a[4]), _pixels(next(data.generate(7, 1, 0.5, start=4))))


def test_samples_are_reading_questions_on_two_to_four_tiles():
    for s in data.generate(3, 40):
        kind = s.meta["kind"]
        assert s.question == data.QUESTIONS[kind]
        if kind == "number":
            assert s.answer.isdigit() and 3 <= len(s.answer) <= 5 and s.answer[0] != "0"
        else:
            assert s.answer in data.WORDS
        rows, cols = s.meta["grid"]
        assert 2 <= rows * cols <= 4
        assert s.image.mode == "RGB" and list(s.image.size[::-1]) == s.meta["image_size"]


def _independent_cut_check(sample: data.Sample, tile: int, pinpoints) -> bool:
    """Recompute from scratch where the text box lands on the anyres canvas."""
    h, w = sample.meta["image_size"]
    canvas = select_best_resolution((h, w), pinpoints)
    new_h, new_w = fitted_size((h, w), canvas)
    pad_y, pad_x = (canvas[0] - new_h) // 2, (canvas[1] - new_w) // 2
    x0, y0, x1, y1 = sample.meta["text_bbox"]
    spans = [
        (x0 * new_w / w + pad_x, x1 * new_w / w + pad_x, canvas[1]),
        (y0 * new_h / h + pad_y, y1 * new_h / h + pad_y, canvas[0]),
    ]
    for lo, hi, extent in spans:
        for b in range(tile, extent, tile):
            left, right = b - lo, hi - b
            if min(left, right) >= data.MIN_CUT_FRACTION * (hi - lo) and left > 0 and right > 0:
                return True
    return False


def test_boundary_subset_really_straddles_a_tile_boundary():
    cfg = demo_config()
    tile, pinpoints = cfg.tile_size, cfg.image_grid_pinpoints
    heldout = data.heldout_set()
    assert len(heldout) == data.HELDOUT_SIZE
    subset = data.boundary_subset(heldout)
    forced = [s for s in heldout if s.meta["mode"] == "boundary"]
    assert len(forced) == data.HELDOUT_SIZE // 2 and all(s.boundary for s in forced)
    assert len(subset) >= len(forced)
    for s in heldout:
        assert _independent_cut_check(s, tile, pinpoints) == s.boundary, s.meta
    # The recorded canvas is the one preprocessing picks for the image.
    pcfg = preprocess_config(cfg)
    for s in subset[:10]:
        assert tuple(s.meta["canvas"]) == select_best_resolution(
            (s.image.height, s.image.width), pcfg.grid_pinpoints
        )
    inside = [data.make_sample(5, i, boundary=False) for i in range(10)]
    assert not any(s.boundary or s.meta["cuts"] for s in inside)


def test_question_set_jsonl_round_trip(tmp_path):
    samples = list(data.generate(4, 5, boundary_share=0.4))
    path = data.write_question_set(samples, tmp_path / "set")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in lines] == [s.answer for s in samples]
    assert {"image", "question", "answer", "boundary"} <= set(lines[0])
    back = data.read_question_set(tmp_path / "set")
    assert len(back) == len(samples)
    for a, b in zip(samples, back, strict=True):
        assert (a.question, a.answer, a.boundary, a.meta) == (
            b.question,
            b.answer,
            b.boundary,
            b.meta,
        )
        assert np.array_equal(_pixels(a), _pixels(b))


# --- config, prompts, batching -----------------------------------------------------------------


def test_demo_config_fits_the_task():
    prompts = T.demo_prompts(demo_config().vocab_size)
    assert prompts.tokenizer.get_vocab_size() == demo_config().vocab_size
    for convnext in (True, False):
        cfg = demo_config(convnext=convnext)
        assert cfg.has_convnext is convnext
        assert all(
            h % cfg.tile_size == 0 and w % cfg.tile_size == 0 for h, w in cfg.image_grid_pinpoints
        )
        model = FilaForConditionalGeneration(cfg)
        assert sum(p.numel() * 4 for p in model.state_dict().values()) < 20e6  # fp32 checkpoint
    pcfg = preprocess_config(cfg)
    longest = max(num_image_tokens((h, w), pcfg) for h, w in cfg.image_grid_pinpoints)
    chat = [(data.COLOUR_QUESTION, "ORANGE"), (data.QUESTIONS["word"], max(data.WORDS, key=len))]
    assert longest + len(T.chat_ids(prompts, chat)[0]) <= cfg.max_position_embeddings


def test_init_demo_weights_makes_the_convnext_trainable():
    model = FilaForConditionalGeneration(demo_config())
    init_demo_weights(model, 0)
    norms = [m for m in model.convnext.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    for block in model.cvfm:  # zero_init_cvfm: the fusion starts as the identity
        assert not block.fc2.weight.any() and not block.fc2.bias.any()


def test_training_targets_are_the_answers_in_the_chat_template():
    """Training ids are what the tokenizer makes of the rendered chat; labels are the answers."""
    prompts = T.demo_prompts(demo_config().vocab_size)
    eos = prompts.eos_token_ids[0]
    for s in data.generate(2, 6):
        text = prompts.format(s.question, num_images=1)
        ids, labels = T.chat_ids(prompts, [(s.question, s.answer)])
        assert ids == prompts.encode(text + " " + s.answer) + [eos]
        assert ids[: len(T.prompt_ids(prompts, s.question))] == T.prompt_ids(prompts, s.question)
        answer = [t for t in labels if t != T.IGNORE]
        assert answer[-1] == eos and prompts.decode(answer[:-1]).strip() == s.answer
        turns = [(data.COLOUR_QUESTION, s.meta["box_colour"]), (s.question, s.answer)]
        two = prompts.render(
            [
                {"role": "user", "content": "<image>\n" + turns[0][0]},
                {"role": "assistant", "content": turns[0][1]},
                {"role": "user", "content": turns[1][0]},
            ]
        )
        assert T.chat_ids(prompts, turns)[0] == prompts.encode(two + " " + s.answer) + [eos]


@pytest.mark.parametrize("convnext", [True, False])
def test_batched_encoding_matches_encode_image(convnext):
    cfg = demo_config(convnext=convnext)
    model = FilaForConditionalGeneration(cfg)
    model.init_weights(0)  # CVFM not zero-initialised: the fusion path counts
    prompts = T.demo_prompts(cfg.vocab_size)
    examples = [T.make_example(s, prompts, cfg) for s in data.generate(9, 6, 0.5)]
    with torch.no_grad():
        batched = T.encode_images(model, [ex.image for ex in examples])
        for ex, feats in zip(examples, batched, strict=True):
            torch.testing.assert_close(feats.embeds, model.encode_image(ex.image).embeds)
            assert feats.embeds.shape[0] == ex.ids.count(cfg.image_token_index)
    ids, mask, labels = T.collate(examples)
    assert ids.shape == mask.shape == labels.shape
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        assert ids[b, :n].tolist() == ex.ids and labels[b, :n].tolist() == ex.labels
        assert mask[b].sum() == n and (labels[b, n:] == T.IGNORE).all()


# --- training ----------------------------------------------------------------------------------


def _shrunk(convnext: bool):
    cfg = demo_config(convnext=convnext)
    vision = {**cfg.vision, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}
    text = {**cfg.text, "hidden_size": 64, "intermediate_size": 128}
    return dataclasses.replace(cfg, vision=vision, text=text)


@pytest.mark.parametrize("convnext", [True, False])
def test_a_few_steps_lower_the_loss(convnext):
    cfg = _shrunk(convnext)
    model = FilaForConditionalGeneration(cfg)
    init_demo_weights(model, 0)
    prompts = T.demo_prompts(cfg.vocab_size)
    examples = [T.make_example(s, prompts, cfg) for s in data.generate(1, 4, 0.5)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = T.batch_loss(model, examples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_reading_head_targets_mark_each_character():
    cfg = demo_config()
    n2 = cfg.tokens_per_side**2
    for s in data.generate(4, 12, 0.5):
        chars, places = T.char_targets(s, cfg)
        rows, cols = s.meta["grid"]
        assert chars.shape == places.shape == ((1 + rows * cols) * n2,)
        assert (chars[:n2] == T.IGNORE).all()  # no labels on the base thumbnail
        marked = np.flatnonzero(places > 0)
        # One token per character centre (two centres rarely share a token: the later wins).
        assert len(s.answer) - 1 <= len(marked) <= len(s.answer)
        for k in marked:
            assert T.CHARS[chars[k] - 1] == s.answer[places[k] - 1]
        assert ((chars == 0) == (places == 0)).all() and (chars == 0).sum() > len(marked)


def test_reading_head_loss_goes_down():
    cfg = _shrunk(True)
    model = FilaForConditionalGeneration(cfg)
    init_demo_weights(model, 0)
    head = T.ReadingHead(cfg.text["hidden_size"])
    prompts = T.demo_prompts(cfg.vocab_size)
    examples = [T.make_example(s, prompts, cfg) for s in data.generate(1, 4, 0.5)]
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    heads = []
    for _ in range(12):
        parts: dict = {}
        loss = T.batch_loss(model, examples, head, 2.0, parts)
        assert loss.item() == pytest.approx(parts["lm"] + 2.0 * parts["head"], rel=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        heads.append(parts["head"])
    assert heads[-1] < 0.5 * heads[0], heads


def test_schedule_warms_up_then_decays():
    s = T.TrainSettings(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [T.lr_at(i, 100, s) for i in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_training_script_end_to_end(tmp_path):
    """A few steps through the script: checkpoint + tokenizer + metrics.json, loadable."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import train_demo_model

    out = tmp_path / "ckpt"
    argv = ["--out", str(out), "--steps", "3", "--threads", "1", "--batch-size", "4"]
    argv += ["--eval-every", "2", "--eval-samples", "2", "--heldout", "4", "--no-progress"]
    argv += ["--head-weight", "2"]
    assert train_demo_model.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["n"] == 4 and metrics["seed"] == 0
    assert metrics["head_weight"] == 2
    assert {"accuracy", "boundary_accuracy", "wall_time_s", "command"} <= set(metrics)
    from fila_export.model.checkpoint import load_checkpoint
    from runtime.prompt import PromptBuilder

    model, cfg = load_checkpoint(out)
    assert cfg.has_convnext and cfg.vocab_size == demo_config().vocab_size
    built = PromptBuilder.from_folder(out)
    assert built.tokenizer.get_vocab_size() == cfg.vocab_size
    prompt = built.format(data.QUESTIONS["number"], num_images=1) + " 4821"
    assert built.encode(prompt) == T.demo_prompts(cfg.vocab_size).encode(prompt)


def test_shipped_checkpoint_reads_the_bundled_examples():
    """The demo model in the repository: small, documented, and it reads (issue 8)."""
    from fila_export.model.reference import ReferencePipeline

    folder = Path(__file__).resolve().parent.parent / "fila_export" / "demo" / "checkpoint"
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 2**20
    metrics = json.loads((folder / "metrics.json").read_text())
    ablation = json.loads((folder / "ablation_metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9 and metrics["n"] == data.HELDOUT_SIZE
    assert metrics["boundary_accuracy"] > ablation["boundary_accuracy"]
    pipe = ReferencePipeline.from_checkpoint(folder)
    samples = data.read_question_set(folder.parent / "examples")
    got = [pipe.generate([s.image], s.question, max_new_tokens=10).text.strip() for s in samples]
    assert sum(g == s.answer for g, s in zip(got, samples, strict=True)) >= len(samples) - 1, got
