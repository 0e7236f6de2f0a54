"""Options several verbs share: the artifacts/backend/precision group and the sampling group."""

from __future__ import annotations

import argparse

PRECISION_HELP = (
    "stage variants: fp32, fp16, int8, w8, w4; a list (int8,w4: each stage takes the first it "
    "has) or per stage or group (vision=int8,decoder=w4)"
)


def split_list(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (empty items dropped)."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def joined(values: list[str] | None) -> list[str]:
    """``--stages a b,c`` -> ``["a", "b", "c"]``."""
    return [s for part in values or [] for s in split_list(part)]


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, help="folder written by fila export")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", help=PRECISION_HELP + " (default: the export's base precision)")
    p.add_argument("--providers", help="onnxruntime providers, e.g. cuda,cpu (default: cpu)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument(
        "--decoder",
        choices=["auto", "gqa", "portable"],
        default="auto",
        help="decoder graph: gqa (onnxruntime's in-place GroupQueryAttention), portable "
        "(standard ONNX, what TensorRT builds); auto: the one the export made for the backend",
    )


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)


def sampling(args: argparse.Namespace):
    """The sampling options as ``SamplingParams`` (out-of-range values refused here)."""
    from runtime.generate import SamplingParams

    return SamplingParams(
        args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed
    )


def runner_options(args: argparse.Namespace) -> dict:
    opts = {}
    if args.backend == "onnxruntime":
        if args.providers:
            opts["providers"] = split_list(args.providers)
        if args.threads:
            opts["threads"] = args.threads
    return opts


def load_pipeline(args: argparse.Namespace):
    from runtime.pipeline import FilaPipeline

    return FilaPipeline.from_artifacts(
        args.artifacts,
        backend=args.backend,
        precision=args.precision,
        decoder=args.decoder,
        **runner_options(args),
    )
