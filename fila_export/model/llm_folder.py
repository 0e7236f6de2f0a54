"""The checkpoint's LLM alone, as a plain transformers causal-LM folder: what other engines'
converters read (llama.cpp's ``convert_hf_to_gguf.py``, onnxruntime-genai's model builder), so a
side-by-side benchmark starts from the very weights our export was made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fila_export.model.checkpoint import open_weights
from fila_export.model.config import FilaConfig
from fila_export.model.weights import ShardWriter
from runtime.errors import ConfigError

PREFIX = "language_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def llm_config(config: FilaConfig) -> dict:
    """The text config as a standalone transformers ``config.json``."""
    text = dict(config.text)
    kind = text.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(
            f"LLM type {kind!r} has no standalone folder here; supported: {sorted(ARCHITECTURES)}"
        )
    return text | {"architectures": [ARCHITECTURES[kind]], "torch_dtype": "float32"}


def write_llm_folder(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``language_model.*`` tensors (prefix stripped), the config and the tokenizer files to
    ``out``, one tensor in memory at a time (a tied head stays tied: it is not written)."""
    checkpoint, out = Path(checkpoint), Path(out)
    config = FilaConfig.from_pretrained(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    store = open_weights(checkpoint)
    writer = ShardWriter(out)
    tied = bool(config.text.get("tie_word_embeddings"))
    for key in sorted(k for k in store.keys() if k.startswith(PREFIX)):
        name = key[len(PREFIX) :]
        if tied and name == "lm_head.weight":
            continue
        writer.add(name, store.get(key))
    writer.close()
    (out / "config.json").write_text(json.dumps(llm_config(config), indent=2))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    return out
