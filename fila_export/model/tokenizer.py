"""A small byte-level BPE tokenizer built offline with the ``tokenizers`` library (no hub).

Special tokens take the first ids so every preset agrees: <pad>=0, <s>=1, </s>=2, <image>=3.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = range(4)
IMAGE_TOKEN = "<image>"

# Vicuna-style template, as LLaVA-NeXT (vicuna) uses; messages carry plain string content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS_WORDS = (
    "the a an of to in is it that on for with as was at by be this from or are what which who "
    "where when how why number word text image picture photo page document table chart box line "
    "read reads reading write written small large red green blue black white yellow orange gray "
    "left right top bottom middle corner above below inside outside near first second third last "
    "question answer describe see shows contains there one two three four five six seven eight "
    "nine ten zero hello world invoice total date name price item code label sign street store "
    "open close cat dog person man woman rocket coffee astronaut camera model vision language "
    "user assistant yes no please tell me about"
).split()


def training_corpus() -> list[str]:
    """Deterministic text to learn merges from: common words, digits and the chat phrases."""
    lines = [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)]
    lines += [f"USER: {IMAGE_TOKEN}\nWhat is the number? ASSISTANT: {n}" for n in range(0, 1000, 7)]
    lines += [f"What word is in the box? ASSISTANT: {w.upper()} {w}" for w in _CORPUS_WORDS]
    lines += ["0123456789 " * 4, "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,:;!?'\"-"]
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Train the byte-level BPE; ``vocab_size`` caps the learned vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config(max_length: int) -> dict:
    """``tokenizer_config.json``: special tokens and the chat template, as transformers reads it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "image_token": IMAGE_TOKEN,
        "model_max_length": max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(folder: Path, vocab_size: int, max_length: int) -> None:
    tok = build_tokenizer(min(vocab_size, 4096))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(max_length), indent=2)
    )
