"""Prompts: the chat template, tokenization and image-placeholder expansion (torch-free).

The tokenizer files are the one source of the chat template, the EOS token and the image token.
The reference model and the runtime both turn a request into token ids here (``request_ids``), so
their ids agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import CheckpointError, PromptError

IMAGE_PLACEHOLDER = "<image>"


def expand_image_tokens(ids: Sequence[int], image_token: int, counts: Sequence[int]) -> list[int]:
    """Replace the k-th image placeholder by ``counts[k]`` copies of it (LLaVA-NeXT's expansion)."""
    found = sum(1 for t in ids if t == image_token)
    if found != len(counts):
        raise PromptError(
            f"prompt has {found} image placeholder(s) but {len(counts)} image(s) were given; "
            f"put one {IMAGE_PLACEHOLDER} in the prompt per image"
        )
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token:
            out.extend([image_token] * counts[k])
            k += 1
        else:
            out.append(t)
    return out


class PromptBuilder:
    """Chat template + tokenizer of a checkpoint or artifact folder."""

    def __init__(
        self,
        tokenizer,
        chat_template: str | None,
        image_token: str = IMAGE_PLACEHOLDER,
        eos_token: str | None = "</s>",
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise CheckpointError(f"the tokenizer has no {image_token!r} token")
        eos = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = [eos] if eos is not None else []

    @classmethod
    def from_folder(
        cls, folder: str | Path, tokenizer_file: str = "tokenizer.json"
    ) -> PromptBuilder:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / tokenizer_file
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the folder needs a tokenizers tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        eos = cfg.get("eos_token", "</s>")
        if isinstance(eos, dict):
            eos = eos.get("content")
        return cls(tokenizer, template, cfg.get("image_token", IMAGE_PLACEHOLDER), eos)

    def format(
        self,
        prompt: str,
        num_images: int = 1,
        raw: bool = False,
        history: Sequence[tuple[str, str]] = (),
    ) -> str:
        """The text the model sees. ``raw`` keeps the prompt verbatim (placeholder put first when
        absent); otherwise the chat template wraps the conversation (``history``: earlier
        (question, answer) turns), and images without a placeholder open its first question."""
        if not prompt or not prompt.strip():
            raise PromptError("the prompt is empty; give a question or instruction")
        if raw:
            missing = num_images - prompt.count(self.image_token)
            return self.image_token * max(missing, 0) + ("\n" if missing > 0 else "") + prompt
        if self.chat_template is None:
            raise PromptError(
                "the tokenizer files carry no chat_template; use --raw-prompt or add one to "
                "tokenizer_config.json"
            )
        turns = [text for pair in history for text in pair] + [prompt]
        missing = num_images - sum(t.count(self.image_token) for t in turns[::2])
        if missing > 0:  # the images open the conversation (LLaVA's multi-turn form)
            turns[0] = (self.image_token + "\n") * missing + turns[0]
        roles = ["user", "assistant"] * len(history) + ["user"]
        return self.render([{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)])

    def render(self, messages: list[dict]) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True
        )

    def request_ids(
        self,
        prompt: str,
        image_tokens: Sequence[int],
        raw: bool = False,
        history: Sequence[tuple[str, str]] = (),
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, ids with each image placeholder expanded to that image's token count)."""
        prompt_ids = self.encode(
            self.format(prompt, num_images=len(image_tokens), raw=raw, history=history)
        )
        return prompt_ids, expand_image_tokens(prompt_ids, self.image_token_id, image_tokens)

    def chat_ids(
        self, messages: list[dict], image_tokens: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """``request_ids`` for a whole conversation whose messages already hold one placeholder
        per image (a chat-completions request)."""
        if self.chat_template is None:
            raise PromptError("the tokenizer files carry no chat_template; add one to serve chats")
        prompt_ids = self.encode(self.render(messages))
        return prompt_ids, expand_image_tokens(prompt_ids, self.image_token_id, image_tokens)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
