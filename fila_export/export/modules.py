"""What becomes each stage graph: the PyTorch module of a stage, random inputs at given axis
values, and torch.export's dynamic shapes, all from the stage's spec (``stages.py``)."""

from __future__ import annotations

import torch
from torch import nn

from fila_export.export.gqa_decoder import GqaDecoderStage
from fila_export.model import vision
from runtime.spec import StageSpec, TensorSpec, parse_dim, resolve_shape


# --- the wrappers that become graphs ------------------------------------------------------------
class ConvNextStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.convnext = model.convnext

    def forward(self, global_view):
        return tuple(vision.convnext_maps(self.convnext, global_view))


class VitSegment(nn.Module):
    def __init__(self, model, start: int, end: int, embed: bool):
        super().__init__()
        self.vit, self.start, self.end, self.embed = model.vision_tower, start, end, embed

    def forward(self, x):
        hidden = vision.vit_embed(self.vit, x) if self.embed else x
        return vision.run_vit_layers(self.vit, hidden, self.start, self.end)


class CvfmStage(nn.Module):
    def __init__(self, model, k: int):
        super().__init__()
        self.block = model.cvfm[k]

    def forward(self, hidden, stage_map):
        return self.block(hidden, stage_map)


class ProjectorStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.projector = model.multi_modal_projector
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, hidden):
        return self.projector(vision.select_features(hidden, self.strategy))


class VisionStage(nn.Module):
    """The fused graph: tiles (+ global view) -> projected features, for deployment."""

    def __init__(self, model):
        super().__init__()  # the vision modules only: the stage's weights are the graph's
        self.vision_tower, self.convnext, self.cvfm = model.vision_tower, model.convnext, model.cvfm
        self.projector, self.config = model.multi_modal_projector, model.config

    def forward(self, pixel_values, global_view=None):
        feats = vision.encode(
            self.vision_tower, self.convnext, self.cvfm, self.config, pixel_values, global_view
        )
        return self.projector(feats)


class EmbedStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.language_model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderStage(nn.Module):
    """One graph for prefill (past length 0) and decode.

    KV tensors are time-major, (length, batch, kv_heads, head_dim), so the runtime's preallocated
    cache prefix ``cache[:past]`` is contiguous and is fed without a copy; ``present.*`` holds only
    the new positions, which the runtime writes into its cache in place. ``logits`` is the last
    position only: (batch, vocab).
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.language_model
        self.num_layers = model.config.text["num_hidden_layers"]

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(self.num_layers):
            key, value = past[2 * i], past[2 * i + 1]
            cache.update(key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), i)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the head on the last position only (prefill: not seq x vocab)
        )
        seq = inputs_embeds.shape[1]
        present = []
        for layer in out.cache.layers[: self.num_layers]:
            present += [
                layer.keys[:, :, -seq:].permute(2, 0, 1, 3),
                layer.values[:, :, -seq:].permute(2, 0, 1, 3),
            ]
        return (out.logits[:, -1], *present)


def stage_module(model, name: str) -> nn.Module:
    """The eval-mode module whose graph stage ``name`` is, for this model."""
    kind, _, index = name.partition(".")
    if kind == "vit":
        k = int(index)
        start, end = model.config.vit_segments()[k]
        module = VitSegment(model, start, end, embed=k == 0)
    elif kind == "cvfm":
        module = CvfmStage(model, int(index))
    elif name in MODULES:
        module = MODULES[name](model)
    else:
        raise KeyError(f"no stage module for {name!r}")
    return module.eval()


MODULES = {
    "convnext": ConvNextStage,
    "projector": ProjectorStage,
    "vision": VisionStage,
    "embed": EmbedStage,
    "decoder": DecoderStage,
    "decoder_gqa": GqaDecoderStage,
}


def is_cache(name: str) -> bool:
    """KV-cache tensors keep the graph's own dtype at its boundary (fp16 caches in fp16 graphs)."""
    return name.startswith(("past.", "present."))


class GraphIO(nn.Module):
    """What is traced: a stage module at ``dtype`` behind fp32 inputs and outputs (images,
    embeddings, logits stay fp32 at the boundary; the KV cache stays in ``dtype``), so every
    graph of a stage has the same interface whatever its precision. Arguments come flat, in the
    spec's input order."""

    def __init__(self, inner: nn.Module, spec: StageSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.spec, self.dtype = inner, spec, dtype

    def forward(self, *args):
        names = self.spec.input_names()
        args = [
            a.to(self.dtype) if a.is_floating_point() and not is_cache(n) else a
            for a, n in zip(args, names, strict=True)
        ]
        out = self.inner(*args)
        out = out if isinstance(out, tuple) else (out,)
        out = [
            o.float() if o.is_floating_point() and not is_cache(n) else o
            for o, n in zip(out, self.spec.output_names(), strict=True)
        ]
        return tuple(out) if len(out) > 1 else out[0]


class TorchStages:
    """The stage modules of one model run like runners, on ``name -> tensor`` dicts named by each
    stage's spec: ``stages(name, feeds) -> outputs``. Validation and the benchmark's PyTorch
    column walk the vision chain with it (``runtime.vision.walk_chain``)."""

    def __init__(self, model, specs: dict[str, StageSpec]) -> None:
        self.model, self.specs, self.modules = model, specs, {}

    def module(self, name: str) -> nn.Module:
        if name not in self.modules:
            self.modules[name] = stage_module(self.model, name)
        return self.modules[name]

    def __call__(self, name: str, feeds: dict) -> dict:
        spec = self.specs[name]
        with torch.no_grad():
            out = self.module(name)(*(feeds[n] for n in spec.input_names()))
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(spec.output_names(), out, strict=True))


# --- inputs to trace with ----------------------------------------------------------------------
def sample_inputs(
    spec: StageSpec, values: dict[str, int], seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple:
    """Random inputs for a stage at the given axis values (ids and masks made valid; the KV
    cache in ``dtype``, the graph's own)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = list(resolve_shape(t, values))
        if t.name == "input_ids":
            out.append(torch.randint(4, 64, shape, generator=gen))
        elif t.name == "attention_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        elif t.name == "position_ids":
            past = values.get("past", values.get("total", shape[1]) - shape[1])
            out.append(torch.arange(past, past + shape[1]).repeat(shape[0], 1))
        elif t.name == "seqlens_k":  # GQA: index of each row's last token
            out.append(torch.full(shape, values["total"] - 1, dtype=torch.int32))
        elif t.name == "total_sequence_length":
            out.append(torch.tensor(values["total"], dtype=torch.int32))
        else:
            value = torch.randn(shape, generator=gen)
            out.append(value.to(dtype) if is_cache(t.name) else value)
    return tuple(out)


def export_values(spec: StageSpec) -> dict[str, int]:
    """Axis values to trace with: not 0 or 1 (torch.export would specialise them)."""
    values = {k: max(2, min(v.opt, v.max)) for k, v in spec.axes.items()}
    if "rows" in values:
        values["rows"], values["cols"] = 2, 2
        values["tiles"] = 5
    if "seq" in values:  # a decoder: 5 cached positions + 3 new
        values["seq"], values["total"] = 3, 8
        if "past" in values:
            values["past"] = 5
    return values


def parity_inputs(spec: StageSpec, inputs: tuple) -> tuple:
    """What the exported graph is checked on: the traced inputs, but one row for the GQA decoder
    (traced at two rows to stay batch-dynamic; ONNX Runtime's kernel runs a multi-token step
    after a prefix, as traced, for one row only)."""
    if "seqlens_k" not in spec.input_names():
        return inputs
    return tuple(
        x[:1] if t.shape and t.shape[0] == "batch" else x
        for t, x in zip(spec.inputs, inputs, strict=True)
    )


BATCH_TRACED = 64


def dynamic_shapes(spec: StageSpec) -> tuple:
    """torch.export dynamic shapes of a ``GraphIO``'s arguments; the tile count is left for export
    to relate to the grid (tiles = 1 + rows * cols is not a linear expression it can state)."""
    from torch.export import Dim

    def bounds(name: str, r) -> tuple[int, int]:
        if name == "batch":  # the graph stays batch-dynamic; the manifest's max sizes engines
            return 1, max(r.max, BATCH_TRACED)
        return (0 if name == "past" else r.min), r.max

    dims = {
        name: Dim(name.replace(".", "_"), min=lo, max=hi)
        for name, r in spec.axes.items()
        for lo, hi in [bounds(name, r)]
    }

    def one(t: TensorSpec) -> dict:
        shape = {}
        for i, entry in enumerate(t.shape):
            dim = parse_dim(entry)
            if dim.size is not None:
                continue
            if dim.axis == "tiles":
                shape[i] = Dim.AUTO
            else:
                shape[i] = dims[dim.axis] if dim.factor == 1 else dim.factor * dims[dim.axis]
        return shape

    return (tuple(one(t) for t in spec.inputs),)  # ``GraphIO.forward(*args)``: one argument
