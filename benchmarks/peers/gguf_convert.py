"""Run llama.cpp's own GGUF converter (``convert_hf_to_gguf.py`` from a llama.cpp source tree) on
our LLM folder. The converter names a BPE pre-tokenizer by hashing the tokens of a test string and
refuses hashes it does not list; our tokenizers are byte-level BPE with GPT-2's pre-tokenizer
(``ByteLevel``, ``use_regex``) but their own merges, so the hash is new. Only for such a tokenizer,
the name is given as ``gpt-2``; everything else is the converter's.

``python -m benchmarks.peers.gguf_convert LLAMA_CPP_DIR LLM_FOLDER --outfile F --outtype f32``
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

GPT2_PRE = "gpt-2"


def is_gpt2_byte_level(folder: Path) -> bool:
    """The tokenizer's pre-tokenizer is GPT-2's byte-level split (with its regex)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def main(argv: list[str]) -> None:
    llama_dir, llm_folder = Path(argv[0]), Path(argv[1])
    script = llama_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: pass the root of a llama.cpp source tree")
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    if is_gpt2_byte_level(llm_folder):
        from conversion.base import TextModel

        TextModel.get_vocab_base_pre = lambda self, tokenizer: GPT2_PRE
    sys.argv = [str(script), str(llm_folder), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
