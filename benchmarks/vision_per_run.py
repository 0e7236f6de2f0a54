"""fp16 vision on ONNX Runtime's CPU provider: the per-run modular chain the pipeline runs
(``runtime.backends.fp16_on_cpu``) against the fused graph in a session kept open at the ``all``
level (what ran before), and the per-run chain at ``all``. The three alternate in one process;
prints each one's median seconds per image, its ratio to the kept session, and the features'
rel L2 against it. The figures in ``benchmarks/README.md`` ("Memory plan")::

    python -m benchmarks.vision_per_run --artifacts DIR --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from fila_export.demo import PHOTOS
from runtime.backends.onnxruntime import OrtRunner, SessionLoader
from runtime.image_io import load_image
from runtime.manifest import Manifest
from runtime.pipeline import load_vision_chain
from runtime.preprocess import preprocess
from runtime.vision import image_feeds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True, help="an export with fp16 vision graphs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image", default=str(PHOTOS / "grace_hopper.jpg"))
    args = p.parse_args(argv)
    manifest = Manifest.load(args.artifacts)
    per_run = load_vision_chain(manifest, "onnxruntime", "fp16", threads=args.threads)
    per_run_all = load_vision_chain(
        manifest, "onnxruntime", "fp16", threads=args.threads, level="all"
    )
    path = manifest.stage_path("vision", "fp16")
    kept = OrtRunner(SessionLoader(path, threads=args.threads, level="all", arena=False), "vision")
    image = preprocess(load_image(args.image), manifest.preprocess)
    ways = {
        "kept fused session, all": lambda: kept.infer(image_feeds(image))[kept.outputs[0].name],
        "per-run chain, extended (default)": lambda: per_run(image),
        "per-run chain, all": lambda: per_run_all(image),
    }
    seconds = {name: [] for name in ways}
    features = {}
    for _ in range(args.rounds):
        for name, run in ways.items():
            t0 = time.perf_counter()
            features[name] = run()
            seconds[name].append(time.perf_counter() - t0)
    base = "kept fused session, all"
    print("| vision | median s | vs kept | rel L2 vs kept |")
    print("|---|---|---|---|")
    for name, times in seconds.items():
        ratio = np.median(times) / np.median(seconds[base])
        diff = features[name] - features[base]
        rel = np.linalg.norm(diff) / np.linalg.norm(features[base])
        print(f"| {name} | {np.median(times):.1f} | {ratio:.2f}x | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
