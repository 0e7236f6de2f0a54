"""Where a decode step's time goes, per op type (ONNX Runtime's profiler), for each decoder
variant of an export: the profile behind the decode-gap work against llama.cpp.

``python -m benchmarks.decode_profile --artifacts DIR --precisions fp32,w4 --context 128``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.op_profile import profile  # noqa: E402 - after the path set-up
from runtime import onnx_io  # noqa: E402
from runtime.backends.onnxruntime.runner import OrtRunner  # noqa: E402
from runtime.generate import Decoder, DecoderShape  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.variants import choose_decoder, precision_spec, stage_variant  # noqa: E402


def step_profile(artifacts: Path, precision: str, context: int, steps: int, threads: int) -> dict:
    """ms per op type of one decode step after ``context`` positions (mean of ``steps``)."""
    manifest = Manifest.load(artifacts)
    stage = choose_decoder(manifest, "onnxruntime", "auto")
    variant = stage_variant(manifest, precision_spec(manifest, precision), stage, "onnxruntime")
    path = manifest.stage_path(stage, variant)
    shape = DecoderShape.from_text_config(manifest.model["text"])
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_io.session(path, threads=threads, profile=Path(tmp) / "decode")
        decoder = Decoder(OrtRunner(session, stage), shape, 1, context + steps + 4)
        rng = np.random.default_rng(0)
        hidden = manifest.model["text"]["hidden_size"]

        def run() -> None:
            embeds = rng.standard_normal((1, context, hidden)).astype(np.float32) * 0.02
            decoder.prefill(embeds, np.ones((1, context), dtype=np.int64))
            for _ in range(steps + 2):
                decoder.decode_one_token(embeds[:, :1])

        by_op = profile(session, run, steps)
    return {"stage": stage, "variant": variant, "ms_by_op": by_op}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--precisions", default="fp32,w4")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {
        precision: step_profile(
            Path(args.artifacts), precision, args.context, args.steps, args.threads
        )
        for precision in args.precisions.split(",")
    }
    for precision, r in result.items():
        total = r["ms_by_op"]["(model_run)"]
        print(f"## {precision} ({r['stage']} {r['variant']}): {total:.2f} ms a step")
        for op, ms in r["ms_by_op"].items():
            print(f"  {op:40s} {ms:8.3f} ms  {100 * ms / total:5.1f} %")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
