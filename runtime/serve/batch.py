"""The engine's worker with ``--max-batch N > 1``: continuous batching.

Queued requests are admitted into free rows of a ``BatchDecoder`` (each prefilled alone, on its
row), then every running request advances one token per decode step, together. A request leaves
its row at EOS, a stop string, its ``max_tokens`` or its client's disconnect, and the next queued
request takes the row at the next step. Conversation-prefix reuse is off here (each request's KV
lives in its row of the shared buffer); the image-feature cache still applies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from runtime.batching import BatchDecoder
from runtime.errors import FilaError
from runtime.generate import AnswerRow, sample
from runtime.pipeline import GenerationResult, Request


@dataclass
class Running:
    """A request in a row: its answer so far and what its result reports."""

    job: object
    request: Request
    answer: AnswerRow
    rng: np.random.Generator
    timings: dict
    waited: float
    first_token_at: float = 0.0
    samples: int = 0
    last: int = 0
    started: float = field(default_factory=time.perf_counter)


class BatchWorker:
    def __init__(self, engine, rows: int) -> None:
        pipe = engine.pipeline
        self.engine, self.pipe = engine, pipe
        batch_max = pipe.manifest.stage(pipe.decoder_stage)["axes"].get("batch", {}).get("max", 1)
        if pipe.decoder_stage != "decoder_gqa" or batch_max < rows:
            raise FilaError(
                f"--max-batch {rows} needs an export whose decoder_gqa takes batch {rows} (this "
                f"one's {pipe.decoder_stage} takes {batch_max}); re-export with fila export "
                f"--max-batch {rows}, on the ONNX Runtime backend"
            )
        runner = pipe.runners[pipe.decoder_stage]
        self.decoder = BatchDecoder(runner, pipe.decoder_shape, rows, pipe.max_context)
        self.running: dict[int, Running] = {}

    def run(self) -> None:
        """Admit and step until the engine stops; requests still running then are finished."""
        admitting = True
        while admitting or self.running:
            if admitting:
                admitting = self.admit()
            if self.running:
                self.step()

    def admit(self) -> bool:
        """Fill free rows from the queue, waiting for a request when none runs; False at stop."""
        while len(self.running) < self.decoder.rows:
            job = self.engine.take(block=not self.running)
            if not job:
                return job is not None  # False: none waiting, keep stepping; None: stop
            self.engine.guarded(job, lambda j=job: self.start(j))
        return True

    def start(self, job) -> None:
        """Prefill a request into a free row and sample its first token."""
        started = time.perf_counter()
        row = next(r for r in range(self.decoder.rows) if r not in self.running)
        request = self.engine.request(job)
        waited = started - job.arrived
        embeds, timings = self.pipe.request_embeds(request, self.engine.reuse)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(row, embeds)
        timings["prefill_s"] = time.perf_counter() - t0
        answer = AnswerRow(
            self.pipe.eos_ids,
            request.stop,
            self.pipe.prompts.decode,
            lambda piece: job.send("text", piece),
        )
        rng = np.random.default_rng(request.sampling.seed)
        run = Running(job, request, answer, rng, timings, waited, started=started)
        run.first_token_at = time.perf_counter()
        try:
            self.advance(row, run, logits)
        except Exception:
            self.decoder.free(row)
            raise

    def advance(self, row: int, run: Running, logits: np.ndarray) -> None:
        """Sample a row's next token: the request holds its row until its answer is complete."""
        params = run.request.sampling
        token = int(sample(logits[None], params, run.rng, [run.answer.tokens])[0])
        run.samples += 1
        if run.answer.push(token) or run.samples >= run.request.max_new_tokens:
            self.finish(row, run)
        else:
            run.last = token
            self.running[row] = run

    def step(self) -> None:
        """One decode step for every running request (a cancelled one leaves first)."""
        for row, run in list(self.running.items()):
            if run.job.cancelled.is_set():
                self.leave(row)
                self.engine.metrics.cancelled.inc()
        if not self.running:
            return
        rows = self.decoder.rows
        active = np.zeros(rows, dtype=bool)
        tokens = np.zeros((rows, 1), dtype=np.int64)
        for row, run in self.running.items():
            active[row], tokens[row, 0] = True, run.last
        try:
            logits = self.decoder.step(self.pipe.embed(tokens), active)
        except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
            for row, run in list(self.running.items()):
                self.leave(row)
                run.job.send("fatal", exc)
            return
        for row, run in list(self.running.items()):
            try:
                self.advance(row, run, logits[row])
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self.leave(row)
                run.job.send("fatal", exc)

    def leave(self, row: int) -> Running | None:
        self.decoder.free(row)
        return self.running.pop(row, None)

    def finish(self, row: int, run: Running) -> None:
        self.leave(row)
        decode_s = time.perf_counter() - run.first_token_at
        before = sum(run.timings.values())
        run.timings |= {
            "ttft_s": before,
            "decode_s": decode_s,
            "decode_tokens_per_s": (run.samples - 1) / decode_s if decode_s > 0 else 0.0,
            "cached_positions": 0,
        }
        result = GenerationResult(
            run.answer.text(),
            run.answer.tokens,
            run.request.prompt_ids,
            run.timings,
            self.pipe.backend,
        )

        def deliver() -> None:
            self.engine.record(run.job, result, run.waited)  # Cancelled if its client left
            run.job.send("done", result)

        self.engine.guarded(run.job, deliver)
        # rows run side by side: a request occupies the worker for its time / rows
        share = (time.perf_counter() - run.started) / self.decoder.rows
        self.engine.request_seconds = 0.8 * self.engine.request_seconds + 0.2 * share
