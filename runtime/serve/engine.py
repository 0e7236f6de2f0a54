"""One worker thread owns the pipeline and runs requests in arrival order; HTTP handlers hand it
jobs through a bounded queue and read back events (text pieces, then the result or an error).

The pipeline's sessions are used from that one thread only. A full queue refuses at once (429);
a job whose client went away is cancelled at its next token, or skipped if still queued. With
``max_batch`` > 1 the worker steps up to that many requests together (``serve/batch.py``)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import FilaError
from runtime.generate import SamplingParams
from runtime.pipeline import FilaPipeline, GenerationResult, Request
from runtime.reuse import Reuse
from runtime.serve.errors import QueueFull, RequestError
from runtime.serve.images import image_bytes
from runtime.serve.metrics import Metrics


class Cancelled(Exception):
    """The client went away: stop generating."""


@dataclass
class Job:
    """A request for the worker: the conversation, its image URLs and how to answer."""

    messages: list[dict]
    image_urls: list[str]
    max_new_tokens: int
    sampling: dict
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class Settings:
    max_queue: int = 16
    max_image_bytes: int = 20 * 2**20
    image_root: Path | None = None
    max_batch: int = 1


class Engine:
    def __init__(
        self, pipeline: FilaPipeline, settings: Settings, metrics: Metrics, reuse: Reuse
    ) -> None:
        self.pipeline, self.settings, self.metrics, self.reuse = pipeline, settings, metrics, reuse
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max(settings.max_queue, 1))
        work = self._work
        if settings.max_batch > 1:
            from runtime.serve.batch import BatchWorker

            work = BatchWorker(self, settings.max_batch).run
        self.thread = threading.Thread(target=work, name="fila-engine", daemon=True)
        self.request_seconds = 1.0  # a running mean, for Retry-After

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"the server is busy ({self.jobs.qsize()} requests waiting); retry later",
                code="queue_full",
            ) from None
        self.metrics.queue.set(self.jobs.qsize())

    def retry_after(self) -> int:
        return max(1, round(self.request_seconds * (self.jobs.qsize() + 1)))

    def take(self, block: bool = True) -> Job | None | bool:
        """The next queued job whose client is still there; None when the engine stops, False
        when ``block`` is off and none is waiting."""
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return False
            if job is not None:
                self.metrics.queue.set(self.jobs.qsize())
                if job.cancelled.is_set():  # its client left while it waited
                    self.metrics.cancelled.inc()
                    continue
            return job

    def _work(self) -> None:
        while (job := self.take()) is not None:
            t0 = time.perf_counter()
            self.guarded(job, lambda j=job: j.send("done", self._run(j)))
            self.request_seconds = 0.8 * self.request_seconds + 0.2 * (time.perf_counter() - t0)

    def guarded(self, job: Job, work) -> None:
        """Run ``work`` for ``job``; its failure goes to its client, never stops the worker."""
        try:
            work()
        except Cancelled:
            pass
        except FilaError as exc:  # the request's fault: a 4xx for the client
            job.send("error", exc if isinstance(exc, RequestError) else RequestError(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a failed request must not stop the worker
            job.send("fatal", exc)

    def request(self, job: Job) -> Request:
        """The job's images read and preprocessed (or found in the feature cache), its
        conversation as ids."""
        pipe, s = self.pipeline, self.settings
        urls = [image_bytes(u, s.image_root, s.max_image_bytes) for u in job.image_urls]
        features = [pipe.image_features(data, self.reuse) for data in urls]
        prompt_ids, ids = pipe.prompts.chat_ids(job.messages, [f.num_tokens for f in features])
        sampling = SamplingParams(**job.sampling)
        return Request(prompt_ids, ids, features, job.max_new_tokens, sampling, job.stop)

    def _run(self, job: Job) -> GenerationResult:
        request = self.request(job)
        waited = time.perf_counter() - job.arrived

        def on_text(piece: str) -> None:
            job.send("text", piece)

        result = self.pipeline.answer(
            request, on_text, reuse=self.reuse, should_stop=job.cancelled.is_set
        )
        self.record(job, result, waited)
        return result

    def record(self, job: Job, result: GenerationResult, waited: float) -> None:
        """A finished request's figures into the metrics (``Cancelled`` if its client left)."""
        n = len(result.token_ids)
        self.metrics.tokens.inc(n)
        if job.cancelled.is_set():
            self.metrics.cancelled.inc()
            raise Cancelled
        self.metrics.ttft.observe(waited + result.timings["ttft_s"])  # arrival to first token
        self.metrics.cached.inc(result.timings.get("cached_positions", 0))
        if n > 1:
            self.metrics.token_latency.observe(result.timings["decode_s"] / (n - 1))
