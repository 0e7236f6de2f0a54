"""KV-cached generation in a handful of small functions (after gpt-fast): ``prefill``,
``decode_one_token``, ``sample``, and a loop with stop ids, stop strings and streaming."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.backends.base import np_dtype
from runtime.errors import FilaError, ParameterError
from runtime.kv_cache import KVCache, SharedKVCache


@dataclass
class SamplingParams:
    """How the next token is chosen; out-of-range values are refused when it is made."""

    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k filter
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (
                "temperature",
                self.temperature,
                lambda v: math.isfinite(v) and v >= 0,
                ">= 0 (0 = greedy)",
            ),
            ("top_k", self.top_k, lambda v: v >= 0, "a whole number >= 1 (or 0 / none: off)"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                self.repetition_penalty,
                lambda v: math.isfinite(v) and v > 0,
                "> 0 (1 = off)",
            ),
            ("seed", self.seed, lambda v: v >= 0, "a whole number >= 0"),
        ]
        for name, value, ok, valid in checks:
            if value is not None and not ok(value):
                raise ParameterError(f"{name} must be {valid}, got {value}")

    @property
    def greedy(self) -> bool:
        return not self.temperature


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParameterError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[Sequence[int]], penalty: float):
    """transformers' rule: a seen token's positive logit is divided, a negative one multiplied."""
    out = logits.copy()
    for row, ids in enumerate(seen):
        if len(ids):
            idx = np.unique(np.asarray(ids))
            vals = out[row, idx]
            out[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def logits_to_probs(
    logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p filtering."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x, axis=-1)[:, -min(top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    history: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Next token per row: argmax when greedy, else a draw from the filtered distribution."""
    if params.repetition_penalty and params.repetition_penalty != 1.0 and history:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(axis=-1)
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs])


@dataclass(frozen=True)
class DecoderShape:
    """The decoder's cache geometry, read from the model's text config in one place (grouped-query
    attention keeps fewer KV heads than query heads; ``head_dim`` may be set apart from the width)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_text_config(cls, text: dict) -> DecoderShape:
        heads = text["num_attention_heads"]
        return cls(
            num_layers=text["num_hidden_layers"],
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            vocab=text["vocab_size"],
        )

    def kv_bytes_per_position(self, itemsize: int = 4) -> int:
        """Bytes of K and V that one position adds to the cache (what each decode step re-reads)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


class Decoder:
    """The decoder stage with its preallocated KV cache, attention mask and positions.

    The cache is host memory written in place through IO binding (ONNX Runtime), or device memory
    owned by a runner that has ``run_step`` (TensorRT); either way it is allocated once. A graph
    that takes ``seqlens_k`` is ``decoder_gqa``: it gets a ``SharedKVCache`` bound as both its
    past inputs and present outputs, and no attention mask (rows are unpadded).
    """

    def __init__(self, runner, shape: DecoderShape, batch: int, max_len: int) -> None:
        num_layers, kv_heads, head_dim = shape.num_layers, shape.kv_heads, shape.head_dim
        self.runner = runner
        self.on_device = hasattr(runner, "run_step")
        inputs = {meta.name: meta for meta in getattr(runner, "inputs", ())}
        self.shared = "seqlens_k" in inputs
        cache_dtype = np_dtype(inputs["past.0.key"].dtype) if "past.0.key" in inputs else np.float32
        device = getattr(runner, "cache_device", "cpu")  # the GPU under ONNX Runtime's CUDA
        geometry = (num_layers, batch, kv_heads, head_dim, max_len, cache_dtype, device)
        if self.on_device:
            runner.ensure_cache(num_layers, max_len, (batch, kv_heads, head_dim))
            self.cache = None
        elif self.shared:
            self.cache = SharedKVCache(*geometry)
        else:
            self.cache = KVCache(*geometry)
        self.length = 0
        self.mask = np.zeros((batch, max_len), dtype=np.int64)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.logits = np.zeros((batch, shape.vocab), dtype=np.float32)

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.shared:
            return self._run_shared(embeds, positions)
        seq = embeds.shape[1]
        total = self.length + seq
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": np.ascontiguousarray(self.mask[:, :total]),
            "position_ids": np.ascontiguousarray(positions),
        }
        if self.on_device:
            self.logits[...] = self.runner.run_step(feeds, self.length, seq)
        elif hasattr(self.runner, "infer_into"):
            feeds.update(self.cache.past())
            outputs = {"logits": self.logits, **self.cache.slots(seq)}
            self.runner.infer_into(feeds, outputs, release=seq > 1)
        else:
            self.cache.require_host("a runner without IO binding")
            feeds.update(self.cache.past())
            out = self.runner.infer(feeds)
            for name, slot in self.cache.slots(seq).items():
                slot[...] = out[name]
            self.logits[...] = out["logits"]
        if self.cache is not None:
            self.cache.advance(seq)
        self.length = total
        return self.logits

    def _run_shared(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        seq = embeds.shape[1]
        total = self.length + seq
        self.cache.check_room(seq)
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "position_ids": np.ascontiguousarray(positions),
            "seqlens_k": np.full(embeds.shape[0], total - 1, dtype=np.int32),
            "total_sequence_length": np.array(total, dtype=np.int32),
        }
        self.cache.run(self.runner, feeds, self.logits, release=seq > 1)
        self.cache.advance(seq)
        self.length = total
        return self.logits

    def prefill(self, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the prompt (left-padded rows allowed); returns next-token logits (B, V)."""
        if self.shared and not np.all(attention_mask):
            raise FilaError(
                "the decoder_gqa graph takes unpadded rows; run padded batches "
                "with the portable decoder (from_artifacts(..., decoder='portable'))"
            )
        if self.cache is not None:
            self.cache.reset()
        self.length = 0
        seq = embeds.shape[1]
        self.mask[:, :seq] = attention_mask
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        self.next_position = positions[:, -1] + 1
        return self._run(embeds, positions)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (a shared prefix another prompt reuses); the rest
        is overwritten by the next run."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} of {self.length} cached positions")
        if self.on_device:
            raise FilaError("the device KV cache cannot be reused; run a fresh prefill")
        self.mask[:, length:] = 0
        self.length = length
        self.next_position[:] = length
        self.cache.length = length

    def extend(self, embeds: np.ndarray) -> np.ndarray:
        """Run (B, n, D) embeddings after the cached positions (unpadded rows): a prompt whose
        first ``length`` positions are already cached. Returns next-token logits (B, V)."""
        seq = embeds.shape[1]
        self.mask[:, self.length : self.length + seq] = 1
        positions = self.length + np.arange(seq, dtype=np.int64)[None].repeat(embeds.shape[0], 0)
        self.next_position[:] = self.length + seq
        return self._run(embeds, positions)

    def decode_one_token(self, embeds: np.ndarray) -> np.ndarray:
        """One step for (B, 1, D) embeddings of the last sampled tokens."""
        self.mask[:, self.length] = 1
        positions = self.next_position[:, None].copy()
        self.next_position += 1
        return self._run(embeds, positions)


class TextStreamer:
    """Turns token ids into text pieces, never splitting a UTF-8 character across pieces."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None):
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more bytes
            return self.emitted
        if self.on_text and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
        self.emitted = text
        return text

    def flush(self) -> str:
        text = self.decode(self.ids)
        if self.on_text and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
        self.emitted = text
        return text


class AnswerRow:
    """One row's answer as its tokens are sampled: EOS ends it, and with ``decode_text`` its text
    is streamed (``on_text``) and a stop string ends it. Its tokens are the history repetition
    penalty reads. ``generate`` keeps one per row; a batch scheduler one per request."""

    def __init__(
        self,
        eos_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode_text: Callable[[list[int]], str] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self.eos_ids, self.stop_strings = set(eos_ids), tuple(stop_strings)
        self.streamer = TextStreamer(decode_text, on_text) if decode_text else None
        self.tokens: list[int] = []
        self.done = False
        self.stopped = False  # by a stop string

    def push(self, token: int) -> bool:
        """Take the next sampled token; True once the answer is complete."""
        if self.done:
            return True
        if token in self.eos_ids:
            self.done = True
            return True
        self.tokens.append(token)
        if self.streamer is not None:
            text = self.streamer.push(token)
            self.stopped = self.done = any(s in text for s in self.stop_strings)
        return self.done

    def text(self) -> str:
        """The whole answer's text, cut before the first stop string."""
        text = self.streamer.flush() if self.streamer else ""
        for s in self.stop_strings:
            text = text.split(s)[0] if s in text else text
        return text


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]
    ttft_s: float
    decode_s: float
    steps: int
    texts: list[str] = field(default_factory=list)
    first_logits: np.ndarray | None = None  # the prefill's next-token logits (B, V)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(
    decoder: Decoder,
    embed: Callable[[np.ndarray], np.ndarray],
    prompt_embeds: np.ndarray,
    attention_mask: np.ndarray,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
    cached: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationOutput:
    """Prefill, then decode token by token until EOS, a stop string or ``max_new_tokens``.

    ``embed`` maps (B, 1) token ids to (B, 1, D) embeddings; streaming (``on_text``) and stop
    strings need ``decode_text`` and follow row 0. Pass no ``eos_ids`` to ignore EOS (a fixed
    answer length, as benchmarks and accuracy reports compare). ``cached``: the decoder already
    holds the prompt's first ``cached`` positions (a reused prefix): only the rest is run.
    ``should_stop`` is asked before every decode step (a server's cancelled request).
    """
    check_max_new_tokens(max_new_tokens)
    rng = np.random.default_rng(params.seed)
    batch = prompt_embeds.shape[0]
    rows = [AnswerRow(eos_ids, stop_strings, decode_text, on_text)]  # row 0 streams
    rows += [AnswerRow(eos_ids) for _ in range(batch - 1)]
    t0 = time.perf_counter()
    if cached:
        decoder.truncate(cached)
        logits = decoder.extend(prompt_embeds[:, cached:])
    else:
        logits = decoder.prefill(prompt_embeds, attention_mask)
    first_logits = logits.copy()
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = 0
    for step in range(max_new_tokens):
        tokens = sample(logits, params, rng, [row.tokens for row in rows])
        for row, token in zip(rows, tokens, strict=True):
            row.push(int(token))
        if rows[0].stopped:  # a stop string in the streamed row ends them all
            break
        finished = all(row.done for row in rows)
        if finished or step == max_new_tokens - 1 or (should_stop and should_stop()):
            break
        logits = decoder.decode_one_token(embed(tokens[:, None].astype(np.int64)))
        steps += 1
    decode_s = time.perf_counter() - t1
    texts = [rows[0].text()] if decode_text else []
    return GenerationOutput(
        [row.tokens for row in rows], ttft, decode_s, steps, texts, first_logits
    )
