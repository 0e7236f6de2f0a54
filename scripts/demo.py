"""`make demo`: the main job end to end on the built-in default model.

Steps grow as the toolkit does: make (or find) the default checkpoint, answer questions about the
bundled example images with the PyTorch reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [
    ("examples/chelsea.jpg", "What animal is in the picture?"),
    ("examples/page.png", "What does the page say?"),
]


def fila(*args: str) -> None:
    cmd = [sys.executable, "-m", "fila_export.cli", *args]
    print("$ fila " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.1f} s)\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="build/demo")
    args = parser.parse_args()
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "tiny-checkpoint"
    print("== 1. the default model: a deterministic tiny FILA (random weights)\n")
    fila("init", "--preset", "tiny", "--out", str(checkpoint), "--seed", "0", "--force")
    print("== 2. the PyTorch reference answers (random weights: the text is not meaningful)\n")
    for image, prompt in EXAMPLES:
        fila(
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--image",
            image,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
