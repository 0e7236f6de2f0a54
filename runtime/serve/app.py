"""The FastAPI application: OpenAI's ``/v1/chat/completions`` and ``/v1/models``, ``/health``
and Prometheus ``/metrics``, over one ``Engine``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtime.pipeline import FilaPipeline, GenerationResult
from runtime.reuse import Reuse
from runtime.serve.engine import Engine, Job, Settings
from runtime.serve.errors import QueueFull, RequestError, UnknownModel
from runtime.serve.metrics import Metrics
from runtime.serve.schema import ChatRequest, conversation, parse_request

DISCONNECT_POLL_S = 0.25


def create_app(
    pipeline: FilaPipeline, model_name: str, settings: Settings | None = None, reuse=None
) -> FastAPI:
    """The server for one loaded pipeline (``reuse``: a ``runtime.reuse.Reuse``, default on)."""
    metrics = Metrics()
    engine = Engine(pipeline, settings or Settings(), metrics, reuse or Reuse())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="fila serve", lifespan=lifespan)
    app.state.engine = engine

    def error(exc: RequestError) -> JSONResponse:
        metrics.requests.labels(str(exc.status)).inc()
        headers = {"Retry-After": str(engine.retry_after())} if isinstance(exc, QueueFull) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queue": engine.jobs.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "fila-deploy"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        try:
            body = parse_request(await http.body())
            if body.model != model_name:
                raise UnknownModel(body.model, model_name)
            job = make_job(body, pipeline)
            engine.submit(job)
        except RequestError as exc:
            return error(exc)
        kind, value = await next_event(job, http)  # the first piece, or why there is none
        while kind == "text" and not body.stream:
            kind, value = await next_event(job, http)
        if kind == "fatal":  # a server fault: a 500, and the worker goes on to the next job
            metrics.requests.labels("500").inc()
            raise value
        if kind in ("error", "gone"):
            return error(value)
        if body.stream:
            events = stream(job, body, model_name, (kind, value), metrics)
            return StreamingResponse(events, media_type="text/event-stream")
        metrics.requests.labels("200").inc()
        return completion(value, body, model_name)

    return app


async def stream(
    job: Job, body: ChatRequest, model: str, first: tuple, metrics: Metrics
) -> AsyncIterator[str]:
    """Server-sent chunks from the worker's events; ``first`` is the event already read."""
    chunk = Chunk(model)
    yield chunk.event({"role": "assistant", "content": ""})
    kind, value = first
    try:
        while kind == "text":
            yield chunk.event({"content": value})
            kind, value = await job.events.get()
        if kind == "done":
            metrics.requests.labels("200").inc()
            yield chunk.event({}, finish_reason(value, body))
            if body.stream_options and body.stream_options.include_usage:
                yield chunk.usage(value)
        else:  # an error after the stream began: OpenAI's error object, then the end
            exc = value if isinstance(value, RequestError) else RequestError(str(value))
            metrics.requests.labels(str(exc.status)).inc()
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left mid-stream frees the worker at its next token


async def next_event(job: Job, http: Request) -> tuple[str, object]:
    """The worker's next event for ``job``; ("gone", error) once the client has disconnected
    (the job is cancelled: the worker drops it at its next token, or skips it if queued)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except (TimeoutError, asyncio.TimeoutError):  # two classes before Python 3.11
            if await http.is_disconnected():
                job.cancelled.set()
                return "gone", RequestError("the client disconnected", code="client_closed")


def make_job(body: ChatRequest, pipeline: FilaPipeline) -> Job:
    messages, urls = conversation(body.messages, pipeline.prompts.image_token)
    return Job(
        messages,
        urls,
        body.new_tokens,
        body.sampling_fields(),
        body.stops,
        asyncio.get_running_loop(),
    )


def finish_reason(result: GenerationResult, body: ChatRequest) -> str:
    return "length" if len(result.token_ids) >= body.new_tokens else "stop"


def usage(result: GenerationResult) -> dict:
    prompt = len(result.prompt_token_ids)
    completion_tokens = len(result.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def completion(result: GenerationResult, body: ChatRequest, model: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result, body),
            }
        ],
        "usage": usage(result),
    }


class Chunk:
    """Server-sent ``chat.completion.chunk`` events of one streamed answer."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _frame(self, choices: list, extra: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return f"data: {json.dumps(body | (extra or {}))}\n\n"

    def event(self, delta: dict, finish: str | None = None) -> str:
        return self._frame([{"index": 0, "delta": delta, "finish_reason": finish}])

    def usage(self, result: GenerationResult) -> str:
        return self._frame([], {"usage": usage(result)})
