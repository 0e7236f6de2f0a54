"""onnxruntime-genai as a peer: its model builder makes its graph from the same transformers LLM
folder, and its Generator runs it on the same ONNX Runtime (``pip install onnxruntime-genai``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.errors import FilaError

NAME = "onnxruntime-genai"
# our precision -> the model builder's ``-p``
PRECISIONS = {"fp32": "fp32", "w8": "int8", "w4": "int4"}


def installed() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def build(llm_folder: Path, out: Path, precision: str) -> Path:
    """The model builder's CPU graph of the LLM folder at ``precision`` (made once per folder)."""
    if (out / "genai_config.json").is_file():
        return out
    if precision not in PRECISIONS:
        raise FilaError(f"{NAME} has no {precision!r} build; it has {', '.join(PRECISIONS)}")
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(llm_folder),
        "-o",
        str(out),
        "-p",
        PRECISIONS[precision],
        "-e",
        "cpu",
        "-c",
        str(out.parent / "genai-cache"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FilaError(f"{NAME}'s model builder failed:\n{done.stderr[-2000:]}")
    return out


def set_threads(folder: Path, threads: int) -> None:
    """Intra-op threads live in the folder's ``genai_config.json`` session options."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


class GenaiLLM:
    """A built folder loaded by onnxruntime-genai, driven with token ids."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        set_threads(folder, threads)
        self.og = og
        self.model = og.Model(str(folder))

    def _generator(self, max_length: int, run_through_eos: bool = False):
        """A greedy generator; ``run_through_eos`` masks EOS so a timed run never ends early."""
        params = self.og.GeneratorParams(self.model)
        floor = {"min_length": max_length} if run_through_eos else {}
        params.set_search_options(max_length=max_length, do_sample=False, **floor)
        return self.og.Generator(self.model, params)

    def greedy(self, ids: Sequence[int], new_tokens: int) -> list[int]:
        gen = self._generator(len(ids) + new_tokens)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = []
        while len(out) < new_tokens and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def prefill_s(self, ids: Sequence[int]) -> float:
        gen = self._generator(len(ids) + 1)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return time.perf_counter() - t0

    def decode_s(self, ids: Sequence[int], steps: int) -> list[float]:
        gen = self._generator(len(ids) + steps + 1, run_through_eos=True)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()
            samples.append(time.perf_counter() - t0)
        return samples
