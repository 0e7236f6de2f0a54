"""Our LLM alone — the export's ``embed`` and decoder graphs on ONNX Runtime, loaded without vision
— driven the way the peers are: token ids in, greedy ids out, a timed prefill, decode steps at a
context. Greedy answers go through ``runtime.generate.generate``, the loop ``fila run`` uses."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.generate import SamplingParams, generate
from runtime.pipeline import FilaPipeline


class TimedRunner:
    """A runner that records the seconds spent inside each of its session calls (the loop's own
    cost is what a step takes beyond them)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.calls: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def infer(self, feeds: dict) -> dict:
        out = self.runner.infer(feeds)
        self.calls.append(self.runner.last_inference_time)
        return out

    def infer_into(self, feeds: dict, outputs: dict, release: bool = False, binding=None) -> None:
        self.runner.infer_into(feeds, outputs, release, binding)
        self.calls.append(self.runner.last_inference_time)


class OurLLM:
    """The export's LLM at one precision spec (``fp32``, ``w8``, ``w4``) on ONNX Runtime's CPU."""

    def __init__(self, artifacts: str | Path, precision: str, threads: int) -> None:
        self.pipe = FilaPipeline.from_artifacts(
            artifacts, precision=precision, vision="none", threads=threads
        )

    def ids(self, ids: Sequence[int]) -> np.ndarray:
        return self.pipe.embed(np.asarray([list(ids)], dtype=np.int64))

    def greedy(self, ids: Sequence[int], new_tokens: int) -> list[int]:
        out = self._generate(ids, new_tokens)
        return out.token_ids[0]

    def _generate(self, ids: Sequence[int], new_tokens: int):
        decoder = self.pipe.new_decoder(len(ids) + new_tokens + 1)
        mask = np.ones((1, len(ids)), dtype=np.int64)
        return generate(decoder, self.pipe.embed, self.ids(ids), mask, new_tokens, SamplingParams())

    def prefill_s(self, ids: Sequence[int]) -> float:
        """Seconds from token ids to the next token's logits (the embedding included, as the
        peers' prefill includes theirs)."""
        decoder = self.pipe.new_decoder(len(ids) + 1)
        mask = np.ones((1, len(ids)), dtype=np.int64)
        t0 = time.perf_counter()
        decoder.prefill(self.ids(ids), mask)
        return time.perf_counter() - t0

    def decode_s(self, ids: Sequence[int], steps: int) -> list[float]:
        """Seconds of each decode step (embedding the token and one decoder run) after a prefill
        of ``ids``: what llama-bench's token generation at that depth times."""
        decoder = self.pipe.new_decoder(len(ids) + steps + 1)
        decoder.prefill(self.ids(ids), np.ones((1, len(ids)), dtype=np.int64))
        token = np.asarray([[42]], dtype=np.int64)
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            decoder.decode_one_token(self.pipe.embed(token))
            samples.append(time.perf_counter() - t0)
        return samples

    def loop_overhead(self, ids: Sequence[int], new_tokens: int) -> dict:
        """The generate loop's own cost per decode step: its wall time less the time inside the
        embed and decoder sessions (sampling, feeds, the cache's bookkeeping). The loop samples
        once more than it steps, so this rounds the cost up by one sampling (~3 us)."""
        runners = self.pipe.runners
        stage = self.pipe.decoder_stage
        timed = {name: TimedRunner(runners[name]) for name in ("embed", stage)}
        runners.update(timed)
        try:
            out = self._generate(ids, new_tokens)
        finally:
            runners.update({name: t.runner for name, t in timed.items()})
        # each runner's first call is the prompt's (its embedding, the prefill): not a step
        inside = sum(sum(t.calls[1:]) for t in timed.values())
        per_step = out.decode_s / max(out.steps, 1)
        outside = max(out.decode_s - inside, 0.0) / max(out.steps, 1)
        return {
            "step_ms": per_step * 1000,
            "outside_sessions_ms": outside * 1000,
            "share": outside / per_step if per_step else 0.0,
            "steps": out.steps,
        }
