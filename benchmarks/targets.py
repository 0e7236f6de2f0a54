"""What each backend exposes to the benchmark: one callable per stage on fixed inputs.

ONNX Runtime and TensorRT share the runtime pipeline's code; PyTorch eager (the baseline,
``torch_target.py``) runs the reference model, with transformers' own KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import onnx_io
from runtime.image_io import load_image
from runtime.memory import rss_mb
from runtime.pipeline import FilaPipeline, load_vision_chain
from runtime.preprocess import preprocess
from runtime.variants import choose_decoder, precision_spec, stage_variant

STAGE_GROUPS = (
    "preprocess",
    "convnext",
    "vit",
    "cvfm",
    "projector",
    "vision",
    "prefill",
    "decode_step",
)


@dataclass
class Target:
    backend: str
    precision: str
    stages: dict = field(default_factory=dict)  # group -> list of zero-arg callables (summed)
    decode_at: object = None  # (context) -> (prepare(), step()) callables
    end_to_end: object = None  # () -> generated token count
    sizes: dict = field(default_factory=dict)
    decoder_stage: str = "decoder"  # which decoder graph ran (decoder_gqa on ONNX Runtime)
    memory_mb: dict = field(default_factory=dict)  # RSS after loading, vision, prefill
    threads_used: int | None = None  # intra-op threads, read back from the session / torch
    vision: dict = field(default_factory=dict)  # the fused vision variant run, its cosine vs fp32


def session_threads(runner) -> int | None:
    """The intra-op threads an ONNX Runtime session was made with (0: one per core), or None
    for a backend without a thread pool setting (TensorRT)."""
    session = getattr(runner, "session", None)
    if session is None or not hasattr(session, "get_session_options"):
        return None
    threads = session.get_session_options().intra_op_num_threads
    return threads or os.cpu_count()


def stage_group(name: str) -> str:
    """The figure a stage's time counts toward: ``vit.2`` -> ``vit``."""
    return name.split(".")[0]


def runtime_target(
    artifacts: Path,
    backend: str,
    precision: str,
    image_path: Path,
    prompt: str,
    answer_tokens: int,
    threads: int | None,
    decoder: str = "auto",
    providers: Sequence[str] | None = None,
) -> Target:
    opts = {}
    if backend == "onnxruntime":
        opts = {"threads": threads} if threads else {}
        opts |= {"providers": list(providers)} if providers else {}
    # what ``fila run`` runs (the fused graph; the modular chain opened per run where vision is
    # fp16 on the CPU provider); the chain's stages are also timed one by one
    pipe = FilaPipeline.from_artifacts(
        artifacts, backend=backend, precision=precision, decoder=decoder, **opts
    )
    manifest = pipe.manifest
    cfg = pipe.preprocess_config
    image = load_image(image_path)
    pre = preprocess(image, cfg)
    t = Target(backend, precision, decoder_stage=pipe.decoder_stage)
    t.vision = vision_variant(manifest, backend, precision)
    t.threads_used = session_threads(pipe.runners[pipe.decoder_stage])
    chain = timed_chain(manifest, backend, precision)
    modular = load_vision_chain(manifest, backend, precision, **opts) if chain else None
    t.memory_mb["loaded"] = rss_mb()  # the pipeline and the modular chain's stages
    add_chain_stages(t, modular, pre)
    t.stages["preprocess"] = [lambda: preprocess(image, cfg)]
    t.stages["vision"] = [lambda: pipe.run_vision(pre)]
    _, ids = pipe.prompts.request_ids(prompt, [pre.num_tokens])
    prompt_embeds = pipe.prompt_embeds(ids, [pre], [pipe.run_vision(pre)])
    t.memory_mb["after_vision"] = rss_mb()

    def prefill():
        pipe.new_decoder(len(ids) + 1).prefill(prompt_embeds, np.ones((1, len(ids)), np.int64))

    t.stages["prefill"] = [prefill]
    prefill()
    t.memory_mb["after_prefill"] = rss_mb()
    step_embed = pipe.embed(np.asarray([[42]], dtype=np.int64))

    def decode_at(context: int, steps: int):
        dec = pipe.new_decoder(context + steps + 1)
        ids = np.random.default_rng(0).integers(4, 200, (1, context), dtype=np.int64)
        emb = pipe.embed(ids)

        def prepare():
            dec.prefill(emb, np.ones((1, context), np.int64))

        return prepare, lambda: dec.decode_one_token(step_embed)

    t.decode_at = decode_at
    t.stages["decode_step"] = [steady_step(decode_at, len(ids))]

    def end_to_end():  # a fixed answer length
        answer = pipe.generate(image_path, prompt, max_new_tokens=answer_tokens, ignore_eos=True)
        return len(answer.token_ids)

    t.end_to_end = end_to_end
    files = column_files(manifest, backend, precision, decoder)
    t.sizes = {name: onnx_io.graph_bytes(path) for name, path in files.items()}
    engines = artifacts / "engines"
    if backend == "tensorrt" and engines.is_dir():
        t.sizes.update({p.name: p.stat().st_size for p in engines.glob("*.plan")})
    return t


def add_chain_stages(t: Target, modular, pre) -> None:
    """The modular chain's stages (a ``VisionEncoder``, or None: not timed), each timed on the
    inputs one pass over this image records, under its group (``vit.2`` -> ``vit``)."""
    if modular is None:
        return
    feeds: dict = {}
    modular(pre, record=feeds)
    for spec in modular.chain:
        name, runner = spec.name, modular.runners[spec.name]
        t.stages.setdefault(stage_group(name), []).append(
            lambda r=runner, f=feeds[name]: r.infer(f)
        )


def timed_chain(manifest, backend: str, precision: str) -> list[str]:
    """The modular vision stages timed one by one: all of them, but on TensorRT only when every
    one has an engine (``fila build`` makes the fused graph's by default; ``--stages`` the
    chain's), else none: the fused ``vision`` figure is what ``fila run`` runs."""
    chain = manifest.vision_chain
    if backend != "tensorrt":
        return chain
    from runtime.backends.tensorrt.loader import built_engines

    built = built_engines(manifest)
    spec = precision_spec(manifest, precision)
    ok = all((n, stage_variant(manifest, spec, n, backend)) in built for n in chain)
    return chain if ok else []


def vision_variant(manifest, backend: str, precision: str) -> dict:
    """Which fused vision graph a column runs, and the cosine vs fp32 calibration measured."""
    variant = stage_variant(manifest, precision_spec(manifest, precision), "vision", backend)
    accuracy = manifest.variant("vision", variant).get("accuracy", {})
    return {"variant": variant, "cosine": accuracy.get("cosine")}


def column_files(manifest, backend: str, precision: str, decoder: str = "auto") -> dict[str, Path]:
    """The graphs a column loads for vision, embed and its decoder, picked as the pipeline picks
    them; PyTorch eager's decoder is the fp32 portable graph (the same LLM weights)."""
    if backend == "torch":
        return {"decoder": manifest.stage_path("decoder", "fp32")}
    spec = precision_spec(manifest, precision)
    names = ("vision", "embed", choose_decoder(manifest, backend, decoder))
    return {n: manifest.stage_path(n, stage_variant(manifest, spec, n, backend)) for n in names}


def decode_weight_bytes(manifest, backend: str, precision: str, decoder: str = "auto") -> int:
    """Bytes of weights one decode step reads: the initializers of the column's decoder graph.
    Read once per column by the parent: parsing a graph with inline weights (672 MB on ``small``)
    inside a measuring process took 1.3 GB there, part of which stayed in its peak RSS."""
    files = column_files(manifest, backend, precision, decoder)
    return onnx_io.initializer_bytes(
        next(p for name, p in files.items() if name.startswith("decoder"))
    )


def steady_step(decode_at, context: int):
    """One decode step at the request's context, after a prefill done once up front."""
    prepare, step = decode_at(context, 10_000)
    prepare()
    return step
