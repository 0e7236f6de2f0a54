"""`make demo`: the main job end to end on the built-in demo model.

The demo model is a small FILA trained from scratch on CPU on the synthetic reading task of
``fila_export/demo`` (its model card: ``fila_export/demo/checkpoint/README.md``). The examples are
the first held-out questions of that task (``fila_export/demo/examples``: PNGs written by the
data generator + ``questions.jsonl``), none of them seen in training. The demo asks one through
``fila generate`` (PyTorch), exports the model to ONNX, answers every example with PyTorch and
with the torch-free runtime side by side, validates the export's answers and TensorRT
compatibility, and ends with a quick benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fila_export.demo import CHECKPOINT, EXAMPLES  # noqa: E402 - after the path setup


def fila(*args: str, threads: int = 1) -> None:
    cmd = [sys.executable, "-m", "fila_export.cli", *args]
    print("$ fila " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"  ({time.perf_counter() - t0:.1f} s)\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="build/demo", help="where the answers are written")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--examples", default=str(EXAMPLES), help="folder with questions.jsonl")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from fila_export.demo.data import read_question_set
    from fila_export.model.reference import ReferencePipeline

    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint)
    metrics = checkpoint / "metrics.json"
    shown = checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint
    print(f"== 1. the demo model: {shown} (model card: {shown}/README.md)")
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        print(
            f"   trained {m['steps']} steps in {m['train_wall_s'] / 60:.1f} min on CPU; held-out "
            f"exact match {m['accuracy']:.1%} (boundary subset {m['boundary_accuracy']:.1%})\n"
        )
    samples = read_question_set(args.examples)
    images = sorted((Path(args.examples) / "images").glob("*.png"))
    first = images[0].relative_to(ROOT) if images[0].is_relative_to(ROOT) else images[0]
    print("== 2. one question through the CLI\n")
    fila(
        "generate",
        "--checkpoint",
        str(shown),
        "--image",
        str(first),
        "--prompt",
        samples[0].question,
        "--max-new-tokens",
        "10",
        threads=args.threads,
    )
    onnx_dir = work / "onnx"
    print("== 3. export every stage to ONNX (fp32 + strongly typed fp16), with a manifest\n")
    fila(
        "export",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(onnx_dir),
        "--precision",
        "fp16",
        "--force",
        threads=args.threads,
    )
    print(
        f"== 4. all {len(samples)} bundled examples: PyTorch reference and the torch-free "
        "runtime (ONNX Runtime), greedy\n"
    )
    from runtime.pipeline import FilaPipeline

    pipe = ReferencePipeline.from_checkpoint(checkpoint)
    runtime = FilaPipeline.from_artifacts(onnx_dir, threads=args.threads)
    rows, right = [], 0
    for path, s in zip(images, samples, strict=True):
        got = pipe.generate([s.image], s.question, max_new_tokens=10).text.strip()
        ort = runtime.generate(s.image, s.question, max_new_tokens=10).text.strip()
        ok = got == s.answer and ort == got
        right += ok
        where = "straddles a tile boundary" if s.boundary else "not on a tile boundary"
        print(
            f"  {path.name}  {s.question:<26} expected {s.answer:<7} PyTorch {got:<7} "
            f"ONNX Runtime {ort:<7} {'ok' if ok else 'WRONG'}   ({where})"
        )
        rows.append(
            {
                "image": str(path),
                "question": s.question,
                "expected": s.answer,
                "answer": got,
                "runtime_answer": ort,
                "correct": ok,
                "boundary": s.boundary,
            }
        )
    print(f"\n  {right}/{len(samples)} correct (PyTorch and ONNX Runtime agree)\n")
    (work / "demo_answers.json").write_text(json.dumps(rows, indent=2))
    print("== 5. validate the export: task accuracy of each precision against PyTorch\n")
    fila(
        "validate",
        "--artifacts",
        str(onnx_dir),
        "--checkpoint",
        str(shown),
        "--questions",
        str(args.examples),
        "--precisions",
        "fp32,fp16",
        "--tokens",
        "10",
        "--threads",
        str(args.threads),
        threads=args.threads,
    )
    print("== 6. will TensorRT 10.3 (JetPack 6) build every graph? (no TensorRT needed)\n")
    fila("check-trt", "--artifacts", str(onnx_dir), "--trt-version", "10.3", threads=args.threads)
    print("== 7. a quick benchmark (PyTorch eager vs ONNX Runtime; see benchmarks/README.md)\n")
    fila(
        "bench",
        "--artifacts",
        str(onnx_dir),
        "--checkpoint",
        str(shown),
        "--backends",
        "torch,onnxruntime",
        "--precisions",
        "fp32",
        "--images",
        str(Path(args.examples) / "images"),
        "--contexts",
        "64,128",
        "--warmup",
        "1",
        "--runs",
        "3",
        "--decode-steps",
        "8",
        "--answer-tokens",
        "8",
        "--threads",
        str(args.threads),
        "--out",
        str(work / "bench"),
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
