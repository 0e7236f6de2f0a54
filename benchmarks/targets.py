"""What each backend exposes to the benchmark: one callable per stage on fixed inputs.

ONNX Runtime and TensorRT share the runtime pipeline's code; PyTorch eager (the baseline) runs the
reference model, with transformers' own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.image_io import load_image
from runtime.preprocess import preprocess

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


def runtime_target(
    artifacts: Path,
    backend: str,
    precision: str,
    image_path: Path,
    prompt: str,
    answer_tokens: int,
    threads: int | None,
    decoder: str = "auto",
) -> Target:
    from runtime.pipeline import (
        FilaPipeline,
        load_runners,
        modular_vision_stages,
        run_modular_vision,
    )

    opts = {"threads": threads} if threads and backend == "onnxruntime" else {}
    fused = FilaPipeline.from_artifacts(
        artifacts, backend=backend, precision=precision, decoder=decoder, **opts
    )
    # the modular chain's stages are timed one by one; the decoder is loaded once (in ``fused``)
    manifest = fused.manifest
    modular = load_runners(manifest, modular_vision_stages(manifest), backend, precision, **opts)
    cfg = fused.preprocess_config
    image = load_image(image_path)
    pre = preprocess(image, cfg)
    t = Target(backend, precision)
    t.stages["preprocess"] = [lambda: preprocess(image, cfg)]
    t.stages["vision"] = [lambda: fused.run_vision(pre)]
    feeds = {}
    run_modular_vision(modular, pre, feeds)  # one pass records each stage's inputs
    for name, runner in modular.items():
        t.stages.setdefault(name.split(".")[0], []).append(
            lambda r=runner, f=feeds[name]: r.infer(f)
        )
    counts = _prompt_ids(fused, image_path, prompt)
    prompt_embeds = fused.embed(np.asarray([counts], dtype=np.int64))

    def prefill():
        dec = fused.new_decoder(len(counts) + 1)
        dec.prefill(prompt_embeds, np.ones((1, len(counts)), np.int64))

    t.stages["prefill"] = [prefill]
    step_embed = fused.embed(np.asarray([[42]], dtype=np.int64))

    def decode_at(context: int, steps: int):
        dec = fused.new_decoder(context + steps + 1)
        ids = np.random.default_rng(0).integers(4, 200, (1, context), dtype=np.int64)
        emb = fused.embed(ids)

        def prepare():
            dec.prefill(emb, np.ones((1, context), np.int64))

        return prepare, lambda: dec.decode_one_token(step_embed)

    t.decode_at = decode_at
    t.stages["decode_step"] = [_steady_step(decode_at, len(counts))]

    def end_to_end():
        eos, fused.eos_ids = fused.eos_ids, []  # a fixed answer length
        try:
            return len(fused.generate(image_path, prompt, max_new_tokens=answer_tokens).token_ids)
        finally:
            fused.eos_ids = eos

    t.end_to_end = end_to_end
    t.decoder_stage = fused.decoder_stage
    files = column_files(manifest, backend, precision, decoder)
    t.sizes = {name: path.stat().st_size for name, path in files.items()}
    engines = artifacts / "engines"
    if backend == "tensorrt" and engines.is_dir():
        t.sizes.update({p.name: p.stat().st_size for p in engines.glob("*.plan")})
    return t


def column_files(manifest, backend: str, precision: str, decoder: str = "auto") -> dict[str, Path]:
    """The graphs a column loads for vision, embed and its decoder, picked as the pipeline picks
    them; PyTorch eager's decoder is the fp32 portable graph (the same LLM weights)."""
    from runtime.pipeline import choose_decoder, precision_chooser

    if backend == "torch":
        return {"decoder": manifest.stage_path("decoder", "fp32")}
    choose = precision_chooser(precision, list(manifest.stages))
    names = ("vision", "embed", choose_decoder(manifest, backend, decoder))
    return {n: manifest.stage_path(n, choose(n, manifest.stage(n)["variants"])) for n in names}


def decode_weight_bytes(manifest, backend: str, precision: str, decoder: str = "auto") -> int:
    """Bytes of weights one decode step reads: the initializers of the column's decoder graph.
    Read once per column by the parent: parsing a graph with inline weights (672 MB on ``small``)
    inside a measuring process took 1.3 GB there, part of which stayed in its peak RSS."""
    files = column_files(manifest, backend, precision, decoder)
    return onnx_weight_bytes(next(p for name, p in files.items() if name.startswith("decoder")))


def _steady_step(decode_at, context: int):
    """One decode step at the request's context, after a prefill done once up front."""
    prepare, step = decode_at(context, 10_000)
    prepare()
    return step


def _prompt_ids(pipe, image_path: Path, prompt: str) -> list[int]:
    from runtime.preprocess import packing_index
    from runtime.prompt import expand_image_tokens

    pre = preprocess(load_image(image_path), pipe.preprocess_config)
    n = int(
        packing_index(pre.image_size, pre.grid, pipe.preprocess_config.tokens_per_side).shape[0]
    )
    ids = pipe.prompts.encode(pipe.prompts.format(prompt))
    return expand_image_tokens(ids, pipe.image_token_id, [n])


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (what a decode step must read), external data included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def torch_target(
    checkpoint: Path, image_path: Path, prompt: str, answer_tokens: int, threads: int | None
) -> Target:
    """PyTorch eager: the reference model, transformers' generate and cache."""
    import torch

    from fila_export.model import vision
    from fila_export.reference import ReferencePipeline

    if threads:
        torch.set_num_threads(threads)
    ref = ReferencePipeline.from_checkpoint(checkpoint)
    model, config = ref.model, ref.model.config
    image = load_image(image_path)
    pre = preprocess(image, model.preprocess_config)
    pv = torch.from_numpy(pre.pixel_values)
    gv = torch.from_numpy(pre.global_view) if pre.global_view is not None else None
    t = Target("torch", "fp32", decoder_stage="pytorch")
    nograd = torch.no_grad

    def wrap(fn):
        def run():
            with nograd():
                return fn()

        return run

    t.stages["preprocess"] = [lambda: preprocess(image, model.preprocess_config)]
    t.stages["vision"] = [wrap(lambda: model.encode_image(pre))]
    with nograd():
        maps = vision.convnext_maps(model.convnext, gv) if model.convnext is not None else []
        hidden_in = []
        h = vision.vit_embed(model.vision_tower, pv)
        for k, (s, e) in enumerate(vision.vit_segments(config)):
            hidden_in.append(h)
            h = vision.run_vit_layers(model.vision_tower, h, s, e)
            if k < len(maps):
                h = model.cvfm[k](h, maps[k])
        last = h
    if maps:
        t.stages["convnext"] = [wrap(lambda: vision.convnext_maps(model.convnext, gv))]
    segs = vision.vit_segments(config)
    t.stages["vit"] = [
        wrap(
            lambda: vision.run_vit_layers(
                model.vision_tower, vision.vit_embed(model.vision_tower, pv), *segs[0]
            )
        )
    ]
    for k, (s, e) in enumerate(segs[1:], 1):
        if e > s:
            t.stages["vit"].append(
                wrap(
                    lambda h=hidden_in[k], s=s, e=e: vision.run_vit_layers(
                        model.vision_tower, h, s, e
                    )
                )
            )
    for k, m in enumerate(maps):
        t.stages.setdefault("cvfm", []).append(
            wrap(
                lambda k=k, m=m: model.cvfm[k](
                    hidden_in[k + 1] if k + 1 < len(hidden_in) else last, m
                )
            )
        )
    t.stages["projector"] = [
        wrap(
            lambda: model.multi_modal_projector(
                vision.select_features(last, config.vision_feature_select_strategy)
            )
        )
    ]
    _, ids, feats = ref.prepare([image_path], prompt)
    with nograd():
        embeds = model.embed(torch.tensor([ids]), feats)
    lm = model.language_model
    t.stages["prefill"] = [wrap(lambda: lm(inputs_embeds=embeds, use_cache=True))]
    step_embed = lm.get_input_embeddings()(torch.tensor([[42]]))

    def decode_at(context: int, steps: int):
        state = {}
        emb = lm.get_input_embeddings()(
            torch.randint(4, 200, (1, context), generator=torch.Generator().manual_seed(0))
        )

        def prepare():
            with nograd():
                state["cache"] = lm(inputs_embeds=emb, use_cache=True).cache
                state["pos"] = context

        def step():
            with nograd():
                out = lm(
                    inputs_embeds=step_embed,
                    cache=state["cache"],
                    use_cache=True,
                    position_ids=torch.tensor([[state["pos"]]]),
                )
                state["cache"] = out.cache
                state["pos"] += 1
                return out.logits

        return prepare, step

    t.decode_at = decode_at
    t.stages["decode_step"] = [_steady_step(decode_at, len(ids))]

    def end_to_end():
        with nograd():
            _, ids2, feats2 = ref.prepare([image_path], prompt)
            out = model.generate(
                torch.tensor([ids2]),
                feats2,
                max_new_tokens=answer_tokens,
                min_new_tokens=answer_tokens,
            )
        return out.shape[1]

    t.end_to_end = end_to_end
    t.sizes = {"checkpoint": sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))}
    return t
