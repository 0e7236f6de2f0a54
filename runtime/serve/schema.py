"""OpenAI's chat-completions request, checked, and turned into the model's conversation.

Only what the model can honour is accepted: one choice (``n`` = 1), text and image parts, the
sampling fields ``SamplingParams`` knows. Anything out of range is a ``RequestError`` naming the
field and the allowed values, never a traceback. Unknown extra fields are ignored, as OpenAI's
clients send some (``stream_options``, ``user``) that change nothing here."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.serve.errors import RequestError

MAX_TOKENS_DEFAULT = 256
MAX_STOP = 4


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or MAX_TOKENS_DEFAULT

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise RequestError(f"stop takes up to {MAX_STOP} non-empty strings", "stop")
        return tuple(stops)

    def sampling_fields(self) -> dict:
        out = {"temperature": self.temperature or 0.0, "seed": self.seed}
        if self.top_p is not None and self.top_p < 1:
            out["top_p"] = self.top_p
        return out


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a ``ChatRequest``; malformed JSON or fields are a ``RequestError``."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(
            f"the request body is not valid JSON ({exc}); send a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object with model and messages")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(f"{where}: {first['msg']}", where or None) from None


def conversation(messages: list[Message], image_token: str) -> tuple[list[dict], list[str]]:
    """The chat template's messages, each image part replaced by the image placeholder on its
    own line (the same text ``fila run`` builds for an image and a question), and the image
    URLs in prompt order."""
    out, urls = [], []
    for i, message in enumerate(messages):
        if isinstance(message.content, str) or message.content is None:
            out.append({"role": message.role, "content": message.content or ""})
            continue
        text = []
        for part in message.content:
            if part.type == "text":
                text.append(part.text or "")
            elif part.image_url is None:
                raise RequestError("an image_url part needs an image_url object", f"messages.{i}")
            elif message.role != "user":
                raise RequestError("only user messages may carry images", f"messages.{i}")
            else:
                urls.append(part.image_url.url)
                text.append(image_token + "\n")
        out.append({"role": message.role, "content": "".join(text)})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", "messages")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise RequestError("the user messages are empty; ask a question", "messages")
    return out, urls
