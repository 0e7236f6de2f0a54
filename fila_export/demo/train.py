"""Training the demo FILA on the synthetic reading task (CPU, from scratch).

Answer tokens (+ EOS) carry the loss; the vision part is batched by anyres canvas (same tile count,
same ConvNeXt view size) and the LLM part by right padding. From scratch, that loss alone does not
teach the stack to read (the model learns answer priors and ignores the image); a training-only
:class:`ReadingHead` on the projected image tokens, supervised densely with which character's
centre each ViT token holds and its place in the string (:func:`char_targets`), does: the vision
side learns to read and the LLM learns to read its tokens out in order. Evaluation goes through the model's own
inference path: ``encode_image`` + greedy ``generate``, one request at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fila_export.demo import data
from fila_export.model import vision as V
from fila_export.model.fila import FilaForConditionalGeneration, ImageFeatures
from runtime.preprocess import PreprocessedImage, preprocess
from runtime.prompt import PromptBuilder, expand_image_tokens

IGNORE = -100


def demo_prompts(vocab_size: int):
    """The tokenizer (same BPE ``save_checkpoint`` writes for this vocab) and its chat prompts."""
    from fila_export.model.tokenizer import CHAT_TEMPLATE, build_tokenizer

    return PromptBuilder(build_tokenizer(min(vocab_size, 4096)), CHAT_TEMPLATE)


@dataclass
class Example:
    """One chat about one image, ready for the model."""

    image: PreprocessedImage
    ids: list[int]  # BOS + chat, image placeholder expanded
    labels: list[int]  # the token to predict at each position: answers + EOS, else IGNORE
    chars: np.ndarray | None = None  # per ViT token: character class (see char_targets)
    places: np.ndarray | None = None  # per ViT token: 1 + index of that character in the text


def prompt_ids(prompts: PromptBuilder, question: str) -> list[int]:
    """BOS + ``USER: <image>\nquestion ASSISTANT:`` (placeholder not expanded)."""
    return prompts.encode(prompts.format(question, num_images=1))


def answer_ids(prompts: PromptBuilder, answer: str) -> list[int]:
    """Tokens the model must produce after ``ASSISTANT:``: `` answer`` then EOS."""
    ids = prompts.tokenizer.encode(" " + answer, add_special_tokens=False).ids
    return [*ids, *prompts.eos_token_ids]


def chat_ids(prompts: PromptBuilder, turns: Sequence[tuple[str, str]]) -> tuple[list, list]:
    """(ids, labels) of a chat about one image, as the vicuna template renders it: ``USER:
    <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``; labels on answers + EOS."""
    ids: list[int] = []
    labels: list[int] = []
    for k, (question, ans) in enumerate(turns):
        if k == 0:
            p = prompt_ids(prompts, question)
        else:
            text = f"USER: {question} ASSISTANT:"
            p = prompts.tokenizer.encode(text, add_special_tokens=False).ids
        a = answer_ids(prompts, ans)
        ids += p + a
        labels += [IGNORE] * len(p) + a
    return ids, labels


def make_example(
    sample: data.Sample,
    prompts: PromptBuilder,
    model_config,
    turns: Sequence[tuple[str, str]] | None = None,
) -> Example:
    """The sample's reading question (or the given ``turns``) with its image preprocessed."""
    from fila_export.model.config import preprocess_config
    from runtime.preprocess import num_image_tokens

    pcfg = preprocess_config(model_config)
    image = preprocess(sample.image, pcfg)
    count = num_image_tokens(image.image_size, pcfg)
    ids, labels = chat_ids(prompts, turns or [(sample.question, sample.answer)])
    image_token = model_config.image_token_index
    out_ids = expand_image_tokens(ids, image_token, [count])
    pos = ids.index(image_token)
    out_labels = labels[:pos] + [IGNORE] * count + labels[pos + 1 :]
    chars, places = char_targets(sample, model_config)
    return Example(image, out_ids, out_labels, chars, places)


# --- auxiliary reading head (training only) ---------------------------------------------------

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_CHARS = 6


def char_targets(sample: data.Sample, model_config) -> tuple[np.ndarray, np.ndarray]:
    """Dense labels for the auxiliary head, one per ViT token (base thumbnail first, then tiles
    row-major, ``tokens_per_side**2`` each): class ``1 + CHARS.index(c)`` and place ``1 + i`` for
    the token holding the centre of character ``i``; 0 / 0 for tokens off the text; IGNORE for the
    thumbnail and for text tokens holding no character centre."""
    meta = sample.meta
    tile, n = model_config.tile_size, model_config.tokens_per_side
    patch = tile // n
    geo = data.canvas_geometry(tuple(meta["image_size"]), tile, model_config.image_grid_pinpoints)
    rows, cols = geo["grid"]
    (sy, sx), (py, px) = geo["scale"], geo["pad"]
    chars = np.zeros((1 + rows * cols) * n * n, dtype=np.int64)
    places = np.zeros_like(chars)
    chars[: n * n] = IGNORE
    places[: n * n] = IGNORE
    text = meta["text"]
    font = data.load_font(meta["font"], meta["font_size"])
    x0, y0, x1, y1 = meta["text_bbox"]
    origin = x0 - font.getbbox(text)[0]

    def token(cy: float, cx: float) -> int:
        r, i = divmod(int(cy // patch), n)
        c, j = divmod(int(cx // patch), n)
        return (1 + r * cols + c) * n * n + i * n + j

    # Tokens the text box touches (canvas coordinates) hold no label unless a centre is theirs.
    ty0, ty1 = y0 * sy + py, y1 * sy + py
    tx0, tx1 = x0 * sx + px, x1 * sx + px
    for gy in range(int(ty0 // patch), min(rows * n, int(math.ceil(ty1 / patch)))):
        for gx in range(int(tx0 // patch), min(cols * n, int(math.ceil(tx1 / patch)))):
            k = token(gy * patch, gx * patch)
            chars[k] = places[k] = IGNORE
    cy = 0.5 * (ty0 + ty1)
    for i, ch in enumerate(text[:MAX_CHARS]):
        cx = origin + 0.5 * (font.getlength(text[:i]) + font.getlength(text[: i + 1]))
        k = token(min(cy, rows * tile - 1), min(cx * sx + px, cols * tile - 1))
        chars[k], places[k] = 1 + CHARS.index(ch), 1 + i
    return chars, places


class ReadingHead(torch.nn.Module):
    """Per-token character and place classifiers on the projected image features: a training
    aid that teaches the vision side to read (not part of the model, never saved)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.chars = torch.nn.Linear(dim, 1 + len(CHARS))
        self.places = torch.nn.Linear(dim, 1 + MAX_CHARS)

    def loss(self, projected: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
        chars = torch.from_numpy(np.concatenate([ex.chars for ex in examples]))
        places = torch.from_numpy(np.concatenate([ex.places for ex in examples]))
        ce = torch.nn.functional.cross_entropy
        return ce(self.chars(projected), chars, ignore_index=IGNORE) + ce(
            self.places(projected), places, ignore_index=IGNORE
        )


def training_turns(sample: data.Sample, rng, aux_share: float) -> list[tuple[str, str]]:
    """The reading question, and with probability ``aux_share`` also the box-colour question
    (in random order): an easy, localised signal that teaches the model where the box is."""
    turns = [(sample.question, sample.answer)]
    if rng.random() < aux_share:
        aux = (data.COLOUR_QUESTION, sample.meta["box_colour"])
        turns = [aux, *turns] if rng.random() < 0.5 else [*turns, aux]
    return turns


def encode_images(
    model: FilaForConditionalGeneration,
    images: Sequence[PreprocessedImage],
    projected_out: list | None = None,
) -> list[ImageFeatures]:
    """``encode_image`` for many images at once: one ViT/ConvNeXt call per canvas shape.
    ``projected_out``, a list of ``len(images)`` Nones, receives each image's projected
    features before packing (tiles x tokens, dim)."""
    cfg = model.config
    dtype = model.multi_modal_projector.linear_1.weight.dtype
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.canvas), []).append(i)
    out: list[ImageFeatures | None] = [None] * len(images)
    for members in groups.values():
        tiles = [images[i].pixel_values.shape[0] for i in members]
        pixels = torch.cat([torch.from_numpy(images[i].pixel_values) for i in members]).to(dtype)
        hidden = V.vit_embed(model.vision_tower, pixels)
        maps = []
        if model.convnext is not None:
            views = torch.cat([torch.from_numpy(images[i].global_view) for i in members]).to(dtype)
            maps = V.convnext_maps(model.convnext, views)
        for k, (start, end) in enumerate(cfg.vit_segments()):
            hidden = V.run_vit_layers(model.vision_tower, hidden, start, end)
            if k < len(maps):
                parts = hidden.split(tiles)
                hidden = torch.cat(
                    [model.cvfm[k](p, maps[k][j : j + 1]) for j, p in enumerate(parts)]
                )
        feats = V.select_features(hidden, cfg.vision_feature_select_strategy)
        projected = model.multi_modal_projector(feats)
        for i, p in zip(members, projected.split(tiles), strict=True):
            out[i] = ImageFeatures(model.pack(p, images[i]))
            if projected_out is not None:
                projected_out[i] = p.reshape(-1, p.shape[-1])
    return out  # type: ignore[return-value]


def collate(examples: Sequence[Example], pad_id: int = 0):
    """Right-padded (input_ids, attention_mask, labels)."""
    length = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, :n] = torch.tensor(ex.ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(ex.labels)
    return ids, mask, labels


def batch_loss(
    model: FilaForConditionalGeneration,
    examples: Sequence[Example],
    head: ReadingHead | None = None,
    head_weight: float = 1.0,
    parts: dict | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (+ EOS), teacher-forced: ``labels[t]`` is the
    token at ``t``, predicted from position ``t - 1``; plus ``head_weight`` x the reading head's
    loss when a ``head`` is given (``parts`` receives both terms as floats)."""
    ids, mask, labels = collate(examples)
    projected: list = [None] * len(examples)
    feats = encode_images(model, [ex.image for ex in examples], projected if head else None)
    logits = model(ids, feats, attention_mask=mask)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )
    if parts is not None:
        parts["lm"] = loss.item()
    if head is not None and head_weight:
        aux = head.loss(torch.cat(projected), examples)
        if parts is not None:
            parts["head"] = aux.item()
        loss = loss + head_weight * aux
    return loss


@torch.no_grad()
def answer(
    model: FilaForConditionalGeneration,
    prompts: PromptBuilder,
    sample: data.Sample,
    max_new_tokens: int = 10,
) -> str:
    """Greedy answer through the inference path (``encode_image`` + ``generate``), stripped."""
    from fila_export.model.config import preprocess_config
    from runtime.preprocess import num_image_tokens

    pcfg = preprocess_config(model.config)
    image = preprocess(sample.image, pcfg)
    count = num_image_tokens(image.image_size, pcfg)
    ids = expand_image_tokens(
        prompt_ids(prompts, sample.question), model.config.image_token_index, [count]
    )
    feats = [model.encode_image(image)]
    out = model.generate(
        torch.tensor([ids]),
        feats,
        max_new_tokens=max_new_tokens,
        eos_token_id=prompts.eos_token_ids or None,
    )
    new = out[0].tolist()
    if new and new[-1] in prompts.eos_token_ids:
        new = new[:-1]
    return prompts.decode(new).strip()


def score(samples: Sequence[data.Sample], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact match overall, on the boundary subset and off it."""
    hits = [p == s.answer for s, p in zip(samples, predictions, strict=True)]
    on = [h for h, s in zip(hits, samples, strict=True) if s.boundary]
    off = [h for h, s in zip(hits, samples, strict=True) if not s.boundary]

    def acc(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "accuracy": acc(hits),
        "boundary_accuracy": acc(on),
        "non_boundary_accuracy": acc(off),
        "n": len(hits),
        "n_boundary": len(on),
    }


def evaluate(
    model: FilaForConditionalGeneration, prompts: PromptBuilder, samples: Sequence[data.Sample]
) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    preds = [answer(model, prompts, s) for s in samples]
    model.train(was_training)
    return {**score(samples, preds), "predictions": preds}


@dataclass
class TrainSettings:
    steps: int | None = None  # None: fit the step count to ``minutes``
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    train_boundary_share: float = 0.25
    aux_share: float = 0.5  # share of training chats that also ask the box colour
    head_weight: float = 0.0  # weight of the auxiliary reading head's loss (0: no head)
    plain_start: float = 0.0  # share of plain (black-on-white) training images at step 0 ...
    plain_until: float = 0.5  # ... falling linearly to 0 at this fraction of the steps
    eval_every: int = 200
    eval_samples: int = 100  # periodic evals use the first N held-out samples; the final all
    heldout: int = data.HELDOUT_SIZE
    data_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. font_size_range
    progress: bool = True
    log: Callable[[str], None] = print
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine from ``lr`` down to ``lr * min_lr_ratio``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, head, s: TrainSettings):
    """AdamW with decay on matrices (not embeddings); returns it and every trained parameter."""
    named = list(model.named_parameters())
    if head is not None:
        named += [(f"reading_head.{n}", p) for n, p in head.named_parameters()]
    decay, no_decay = [], []
    for name, p in named:
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.98), eps=1e-8)
    return opt, [p for _, p in named]


def training_batch(model, prompts, s: TrainSettings, rng, index: int, step: int, planned: int):
    """The next ``batch_size`` generated examples (plain images early in the curriculum);
    returns them and the next sample index."""
    batch = []
    for _ in range(s.batch_size):
        p_plain = s.plain_start * max(0.0, 1 - step / max(1.0, s.plain_until * planned))
        boundary = True if data.forced_boundary(index, s.train_boundary_share) else None
        sample = data.make_sample(
            s.seed, index, boundary, plain=bool(rng.random() < p_plain), **s.data_kwargs
        )
        index += 1
        turns = training_turns(sample, rng, s.aux_share)
        batch.append(make_example(sample, prompts, model.config, turns))
    return batch, index


def fit_to_budget(model, prompts, heldout, periodic, s: TrainSettings, step, since, t0):
    """Fit the schedule to the time budget: time per step (after the slow first ones), plus
    periodic evals (one timed now on a few samples) and a final full eval. Returns (planned
    steps, seconds spent evaluating)."""
    per_step = (time.perf_counter() - since) / (step - 5)
    te = time.perf_counter()
    evaluate(model, prompts, heldout[:8])
    per_sample = (time.perf_counter() - te) / 8
    spent = time.perf_counter() - te
    reserve = per_sample * len(heldout) * 1.3 + 10
    usable = s.minutes * 60 - (time.perf_counter() - t0) - reserve
    cost = per_step + per_sample * len(periodic) / max(1, s.eval_every)
    planned = max(step + 1, step + int(usable / cost))
    s.log(
        f"time budget: {per_step:.2f} s/step, eval {per_sample:.2f} s/sample -> "
        f"{planned} steps (rerun with --steps {planned} to reproduce the schedule)"
    )
    return planned, spent


def periodic_eval(model, prompts, periodic, s: TrainSettings, step, losses, t0) -> float:
    """Held-out exact match now, logged and kept in ``s.history``; returns its seconds."""
    te = time.perf_counter()
    res = evaluate(model, prompts, periodic)
    ema, head_ema = losses
    rec = {
        "step": step,
        "loss": round(ema, 4),
        "head_loss": round(head_ema, 4),
        "wall_s": round(time.perf_counter() - t0, 1),
        **{k: v for k, v in res.items() if k != "predictions"},
    }
    s.history.append(rec)
    s.log(
        f"step {step}: loss {ema:.3f} (head {head_ema:.3f}), held-out[{len(periodic)}] exact "
        f"match {res['accuracy']:.1%} (boundary {res['boundary_accuracy']:.1%}), "
        f"{rec['wall_s']:.0f} s"
    )
    return time.perf_counter() - te


def train(
    model: FilaForConditionalGeneration, prompts: PromptBuilder, s: TrainSettings
) -> dict[str, Any]:
    """Train in place; returns metrics (the final held-out eval is the caller's)."""
    from tqdm import tqdm

    if s.steps is None and not s.minutes:
        raise ValueError("give steps or minutes")
    torch.manual_seed(s.seed)
    head = ReadingHead(model.config.text["hidden_size"]) if s.head_weight else None
    opt, params = make_optimizer(model, head, s)
    rng = np.random.default_rng([s.seed, 1])
    heldout = data.heldout_set(s.heldout, **s.data_kwargs)
    periodic = heldout[: s.eval_samples]
    model.train()
    t0 = time.perf_counter()
    planned = s.steps or 10**9
    bar = tqdm(total=s.steps, disable=not s.progress, dynamic_ncols=True, mininterval=2)
    step, index, ema, head_ema, eval_time, since = 0, 0, None, 0.0, 0.0, None
    while step < planned:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, planned, s)
        batch, index = training_batch(model, prompts, s, rng, index, step, planned)
        parts: dict[str, float] = {}
        loss = batch_loss(model, batch, head, s.head_weight, parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        ema = parts["lm"] if ema is None else 0.95 * ema + 0.05 * parts["lm"]
        head_ema = 0.95 * head_ema + 0.05 * parts.get("head", 0.0)
        bar.update(1)
        bar.set_postfix(
            loss=f"{ema:.3f}", head=f"{head_ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}"
        )
        if step == 5:
            since = time.perf_counter()
        if s.steps is None and step == 25:
            planned, spent = fit_to_budget(model, prompts, heldout, periodic, s, step, since, t0)
            eval_time += spent
            bar.total = planned
            bar.refresh()
        if s.eval_every and step % s.eval_every == 0 and step < planned:
            eval_time += periodic_eval(model, prompts, periodic, s, step, (ema, head_ema), t0)
        if s.minutes and time.perf_counter() - t0 > s.minutes * 60:
            s.log(f"time budget of {s.minutes} min reached at step {step} of {planned}")
            break
    bar.close()
    return {
        "steps": step,
        "planned_steps": planned,
        "final_loss": round(ema, 4) if ema is not None else None,
        "train_wall_s": round(time.perf_counter() - t0, 1),
        "eval_wall_s": round(eval_time, 1),
        "history": s.history,
    }
