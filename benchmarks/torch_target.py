"""The PyTorch eager baseline column: the reference model's stage modules timed one by one (the
vision chain walked by the same walker as the runtime's), transformers' own KV cache for decode
and its ``generate`` end to end."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.targets import Target, stage_group, steady_step
from fila_export.export.modules import TorchStages
from fila_export.export.stages import stage_specs, vision_chain
from fila_export.model.reference import ReferencePipeline
from runtime.image_io import load_image
from runtime.preprocess import preprocess
from runtime.vision import image_feeds, walk_chain


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def torch_target(
    checkpoint: Path, image_path: Path, prompt: str, answer_tokens: int, threads: int | None
) -> Target:
    """PyTorch eager: the reference model, transformers' generate and cache."""
    if threads:
        torch.set_num_threads(threads)
    ref = ReferencePipeline.from_checkpoint(checkpoint)
    model = ref.model
    cfg = model.preprocess_config
    image = load_image(image_path)
    pre = preprocess(image, cfg)
    t = Target("torch", "fp32", decoder_stage="pytorch")
    t.threads_used = torch.get_num_threads()
    t.stages["preprocess"] = [lambda: preprocess(image, cfg)]
    t.stages["vision"] = [no_grad(lambda: model.encode_image(pre))]
    stages = TorchStages(model, stage_specs(model.config))
    chain = vision_chain(model.config)
    pixels = {k: torch.from_numpy(v) for k, v in image_feeds(pre).items()}
    feeds = {}
    walk_chain([stages.specs[n] for n in chain], stages, pixels, record=feeds)
    for name in chain:
        t.stages.setdefault(stage_group(name), []).append(
            lambda n=name, f=feeds[name]: stages(n, f)
        )
    _, ids, features = ref.prepare([image_path], prompt)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), features)
    lm = model.language_model
    t.stages["prefill"] = [no_grad(lambda: lm(inputs_embeds=embeds, use_cache=True))]
    t.decode_at = decoder_steps(lm)
    t.stages["decode_step"] = [steady_step(t.decode_at, len(ids))]

    def end_to_end():
        with torch.no_grad():
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


def decoder_steps(lm):
    """``decode_at(context, steps) -> (prepare, step)`` on transformers' cache."""
    step_embed = lm.get_input_embeddings()(torch.tensor([[42]]))

    def decode_at(context: int, steps: int):
        state = {}
        ids = torch.randint(4, 200, (1, context), generator=torch.Generator().manual_seed(0))
        emb = lm.get_input_embeddings()(ids)

        def prepare():
            with torch.no_grad():
                state["cache"] = lm(inputs_embeds=emb, use_cache=True).cache
                state["pos"] = context

        def step():
            with torch.no_grad():
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

    return decode_at
