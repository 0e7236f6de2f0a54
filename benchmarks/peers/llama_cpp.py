"""llama.cpp as a peer, from a llama.cpp source tree built with cmake (``--llama-cpp DIR`` or
``FILA_LLAMA_CPP``): its own converter makes the GGUF from the same LLM folder, ``llama-quantize``
the Q8_0 / Q4_0 files, ``llama-bench`` times them, and the ``llama-cpp-python`` bindings (built
against that tree's ``libllama``) give the greedy tokens. How to install: benchmarks/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import FilaError
from runtime.memory import status_kb

NAME = "llama.cpp"
ENV = "FILA_LLAMA_CPP"
# our precision -> llama.cpp's file type
PRECISIONS = {"fp32": "F32", "fp16": "F16", "w8": "Q8_0", "w4": "Q4_0"}
TOOLS = ("llama-bench", "llama-quantize")


def locate(folder: str | Path | None = None) -> Path | None:
    """The source tree (``--llama-cpp`` or ``$FILA_LLAMA_CPP``) when it holds the converter and
    the built tools, else None."""
    folder = folder or os.environ.get(ENV)
    if not folder:
        return None
    root = Path(folder)
    if not (root / "convert_hf_to_gguf.py").is_file():
        return None
    return root if all((bin_dir(root) / t).is_file() for t in TOOLS) else None


def bin_dir(root: Path) -> Path:
    return root / "build" / "bin"


def installed(folder: str | Path | None = None) -> bool:
    return locate(folder) is not None


def _run(command: list[str], what: str, env: dict | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise FilaError(f"{NAME}: {what} failed:\n{(done.stderr or done.stdout)[-2000:]}")


def convert(llm_folder: Path, out: Path, root: Path, precision: str) -> Path:
    """The GGUF at ``precision``: the converter's F32 file, quantized by ``llama-quantize``."""
    if precision not in PRECISIONS:
        raise FilaError(f"{NAME} has no {precision!r} file here; it has {', '.join(PRECISIONS)}")
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "model-F32.gguf"
    if not f32.is_file():
        converter = [sys.executable, "-m", "benchmarks.peers.gguf_convert", str(root)]
        _run([*converter, str(llm_folder), "--outfile", str(f32), "--outtype", "f32"], "convert")
    target = out / f"model-{PRECISIONS[precision]}.gguf"
    if not target.is_file():
        quantize = str(bin_dir(root) / "llama-quantize")
        _run([quantize, str(f32), str(target), PRECISIONS[precision]], "llama-quantize")
    return target


def bench_command(root: Path, gguf: Path, threads: int, test: dict) -> list[str]:
    """One ``llama-bench`` run: ``test`` is ``{"p": N}`` (prefill N tokens from empty) or
    ``{"n": N, "d": [depths]}`` (N generated tokens after each depth)."""
    depths = ",".join(str(d) for d in test.get("d", [0]))
    return [
        str(bin_dir(root) / "llama-bench"),
        *("-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"),
        *("-p", str(test.get("p", 0)), "-n", str(test.get("n", 0)), "-d", depths),
    ]


def run_bench(command: list[str], poll_s: float = 0.01) -> tuple[list[dict], float]:
    """llama-bench's JSON records and its peak RSS in MB, read from ``/proc/PID/status``
    (``VmHWM``) while it runs: ``wait4``'s ``ru_maxrss`` would carry this (large) process's RSS,
    since the child starts as its copy and exec keeps the high-water mark."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak_kb = 0.0
        while proc.poll() is None:
            hwm = status_kb("VmHWM", proc.pid)
            peak_kb = hwm if hwm > peak_kb else peak_kb  # NaN once it has exited
            time.sleep(poll_s)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise FilaError(f"{NAME}: llama-bench failed:\n{err.read()[-2000:]}")
        return json.loads(out.read()), peak_kb / 1024


def bindings_installed() -> bool:
    """llama-cpp-python, for the greedy-token check."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppLLM:
    """A GGUF loaded through llama-cpp-python, driven with token ids (greedy answers only)."""

    def __init__(self, gguf: Path, root: Path, threads: int, context: int = 1024) -> None:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(bin_dir(root)))
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise FilaError(
                f"{NAME}'s greedy-token check needs llama-cpp-python built against {root} "
                "(benchmarks/README.md, 'Peers')"
            ) from exc
        # the KV cache in fp32 (llama.cpp keeps F16 by default), as ours holds it: the check
        # compares the weights and kernels, not a cache rounding
        self.llm = Llama(
            str(gguf), n_ctx=context, n_threads=threads, type_k=0, type_v=0, verbose=False
        )

    def greedy(self, ids: Sequence[int], new_tokens: int) -> list[int]:
        out = []
        tokens = self.llm.generate(list(ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
        for token in tokens:
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out
