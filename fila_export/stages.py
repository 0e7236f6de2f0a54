"""Stage specs, declared once as data: what each exported graph takes and returns.

The exporter (dynamic shapes), the TensorRT builder (optimization profiles), the runtime and the
validator all read these, via ``manifest.json``. A shape entry is an int, an axis name
(``"tiles"``), or ``"<k>*<axis>"`` for an axis that is a whole multiple of another (the ConvNeXt
view is ``global_tile_size * rows`` pixels tall).

Grid bookkeeping lives in the graphs: a CVFM graph derives the tile grid from its ConvNeXt map's
shape (rows = height / window), so the runtime only feeds tensors; the LLaVA-NeXT packing (unpad +
image_newline) is a gather done by the runtime with ``runtime.preprocess.packing_index``, since its
index depends on the original image size, which no graph sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fila_export.config import FilaConfig, preprocess_config
from fila_export.gqa_decoder import GqaDecoderStage, unsupported_reason
from fila_export.model import vision
from runtime.generate import DecoderShape
from runtime.profiles import resolve


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


@dataclass
class StageSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    axes: dict[str, AxisRange]
    build: Callable[[nn.Module], nn.Module] = field(repr=False)
    doc: str = ""
    backends: tuple[str, ...] = ("onnxruntime", "tensorrt")  # which runtimes can run the graph

    def to_dict(self) -> dict:
        return {
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
            "axes": {k: asdict(v) for k, v in self.axes.items()},
            "doc": self.doc,
            "backends": list(self.backends),
        }


# --- the wrappers that become graphs ---------------------------------------------------------
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
        super().__init__()
        self.model = model

    def forward(self, pixel_values, global_view=None):
        m = self.model
        feats = vision.encode(
            m.vision_tower, m.convnext, m.cvfm, m.config, pixel_values, global_view
        )
        return m.multi_modal_projector(feats)


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
        )
        seq = inputs_embeds.shape[1]
        present = []
        for layer in out.cache.layers[: self.num_layers]:
            present += [
                layer.keys[:, :, -seq:].permute(2, 0, 1, 3),
                layer.values[:, :, -seq:].permute(2, 0, 1, 3),
            ]
        return (out.logits[:, -1], *present)


# --- the specs -------------------------------------------------------------------------------
def vision_axes(config: FilaConfig) -> dict[str, AxisRange]:
    """Tile count and grid ranges over every canvas the preprocessing can choose."""
    grids = preprocess_config(config).grid_shapes()
    cells = [r * c for r, c in grids]
    typical = max(grids, key=lambda g: g[0] * g[1])
    return {
        "tiles": AxisRange(1 + min(cells), 1 + typical[0] * typical[1], 1 + max(cells)),
        "rows": AxisRange(min(r for r, _ in grids), typical[0], max(r for r, _ in grids)),
        "cols": AxisRange(min(c for _, c in grids), typical[1], max(c for _, c in grids)),
    }


def decoder_axes(config: FilaConfig, max_context: int, max_batch: int) -> dict[str, AxisRange]:
    return {
        "batch": AxisRange(1, 1, max_batch),
        "seq": AxisRange(1, min(512, max_context), max_context),
        "past": AxisRange(0, min(512, max_context - 1), max_context - 1),
        "total": AxisRange(1, min(513, max_context), max_context),
    }


def stage_specs(
    config: FilaConfig, max_context: int | None = None, max_batch: int = 4
) -> dict[str, StageSpec]:
    """Every stage of this model, in execution order (the modular vision chain first)."""
    max_context = max_context or min(config.max_position_embeddings, 4096)
    t, n = config.tile_size, config.tokens_per_side
    d_vit, d_text = config.vision["hidden_size"], config.text["hidden_size"]
    tokens = 1 + n * n
    vax = vision_axes(config)
    hidden = TensorSpec("hidden", "float32", ("tiles", tokens, d_vit))
    hidden_out = TensorSpec("hidden_out", "float32", ("tiles", tokens, d_vit))
    pixels = TensorSpec("pixel_values", "float32", ("tiles", 3, t, t))
    g = config.global_tile_size if config.has_convnext else 0
    global_view = TensorSpec("global_view", "float32", (1, 3, f"{g}*rows", f"{g}*cols"))
    specs: dict[str, StageSpec] = {}
    segments = vision.vit_segments(config)
    if config.has_convnext:
        windows = vision.cvfm_windows(config)
        maps = [
            TensorSpec(f"stage{i}", "float32", (1, dim, f"{w}*rows", f"{w}*cols"))
            for i, (dim, w) in enumerate(zip(config.convnext.dims, windows, strict=True))
        ]
        specs["convnext"] = StageSpec(
            "convnext", [global_view], maps, vax, ConvNextStage, "global view -> four stage maps"
        )
    for k, (start, end) in enumerate(segments):
        if end > start or k == 0:
            inp = pixels if k == 0 else hidden
            specs[f"vit.{k}"] = StageSpec(
                f"vit.{k}",
                [inp],
                [hidden_out],
                vax,
                lambda m, s=start, e=end, k=k: VitSegment(m, s, e, embed=k == 0),
                f"ViT layers {start + 1}..{end}" + (" (with patch embedding)" if k == 0 else ""),
            )
        if config.has_convnext and k < 4:
            specs[f"cvfm.{k}"] = StageSpec(
                f"cvfm.{k}",
                [hidden, maps[k]],
                [hidden_out],
                vax,
                lambda m, k=k: CvfmStage(m, k),
                f"CVFM after ViT layer {end}",
            )
    specs["projector"] = StageSpec(
        "projector",
        [hidden],
        [TensorSpec("image_features", "float32", ("tiles", n * n, d_text))],
        vax,
        ProjectorStage,
        "feature select + mlp2x_gelu",
    )
    vision_in = [pixels, global_view] if config.has_convnext else [pixels]
    specs["vision"] = StageSpec(
        "vision",
        vision_in,
        specs["projector"].outputs,
        vax,
        VisionStage,
        "fused hybrid encoder + projector (deployment graph)",
    )
    specs["embed"] = StageSpec(
        "embed",
        [TensorSpec("input_ids", "int64", ("batch", "seq"))],
        [TensorSpec("inputs_embeds", "float32", ("batch", "seq", d_text))],
        decoder_axes(config, max_context, max_batch),
        EmbedStage,
        "token ids -> embeddings",
    )
    shape = DecoderShape.from_text_config(config.text)
    kv_heads, head_dim, layers = shape.kv_heads, shape.head_dim, shape.num_layers
    past = [
        TensorSpec(f"past.{i}.{kv}", "float32", ("past", "batch", kv_heads, head_dim))
        for i in range(layers)
        for kv in ("key", "value")
    ]
    present = [
        TensorSpec(f"present.{i}.{kv}", "float32", ("seq", "batch", kv_heads, head_dim))
        for i in range(layers)
        for kv in ("key", "value")
    ]
    specs["decoder"] = StageSpec(
        "decoder",
        [
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", d_text)),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            *past,
        ],
        [TensorSpec("logits", "float32", ("batch", config.vocab_size)), *present],
        decoder_axes(config, max_context, max_batch),
        DecoderStage,
        DecoderStage.__doc__.split("\n")[0],
    )
    if unsupported_reason(config.text) is None:
        specs["decoder_gqa"] = gqa_decoder_spec(config, max_context)
    return specs


def gqa_decoder_spec(config: FilaConfig, max_context: int) -> StageSpec:
    """The ONNX Runtime decoder (``fila_export.gqa_decoder``): one shared cache buffer per layer,
    (1, kv_heads, total, head_dim), read and written in place; ``total`` is its length. Batch 1:
    ORT's kernel takes multi-token steps after a prefix (chunked prefill) only for one row."""
    shape = DecoderShape.from_text_config(config.text)
    kv_heads, head_dim, layers = shape.kv_heads, shape.head_dim, shape.num_layers
    cache = (1, kv_heads, "total", head_dim)
    axes = decoder_axes(config, max_context, 1)
    del axes["past"], axes["batch"]
    return StageSpec(
        "decoder_gqa",
        [
            TensorSpec("inputs_embeds", "float32", (1, "seq", config.text["hidden_size"])),
            TensorSpec("position_ids", "int64", (1, "seq")),
            TensorSpec("seqlens_k", "int32", (1,)),
            TensorSpec("total_sequence_length", "int32", ()),
            *[
                TensorSpec(f"past.{i}.{kv}", "float32", cache)
                for i in range(layers)
                for kv in ("key", "value")
            ],
        ],
        [
            TensorSpec("logits", "float32", (1, config.vocab_size)),
            *[
                TensorSpec(f"present.{i}.{kv}", "float32", cache)
                for i in range(layers)
                for kv in ("key", "value")
            ],
        ],
        axes,
        GqaDecoderStage,
        "decoder for ONNX Runtime: GroupQueryAttention on a shared in-place KV buffer",
        backends=("onnxruntime",),
    )


def vision_chain(config: FilaConfig) -> list[str]:
    """The modular stages in execution order (what the fused ``vision`` graph computes)."""
    return [
        s
        for s in stage_specs(config, max_context=8)
        if s not in ("vision", "embed", "decoder", "decoder_gqa")
    ]


# --- sample inputs and torch.export dynamic shapes -------------------------------------------
def sample_inputs(spec: StageSpec, values: dict[str, int], seed: int = 0) -> tuple:
    """Random inputs for a stage at the given axis values (ids and masks made valid)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = [resolve(d, values) for d in t.shape]
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
            out.append(torch.randn(shape, generator=gen))
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


def dynamic_shapes(spec: StageSpec) -> tuple:
    """torch.export dynamic shapes for a spec; the tile count is left for export to relate to the
    grid (tiles = 1 + rows * cols is not a linear expression torch.export can state)."""
    from torch.export import Dim

    dims = {
        name: Dim(name.replace(".", "_"), min=r.min, max=r.max) for name, r in spec.axes.items()
    }
    if "past" in dims:
        dims["past"] = Dim("past", min=0, max=spec.axes["past"].max)

    def one(t: TensorSpec) -> dict:
        shape = {}
        for i, entry in enumerate(t.shape):
            if isinstance(entry, int):
                continue
            if entry == "tiles":
                shape[i] = Dim.AUTO
            elif "*" in entry:
                k, axis = entry.split("*")
                shape[i] = int(k) * dims[axis]
            else:
                shape[i] = dims[entry]
        return shape

    shapes = [one(t) for t in spec.inputs]
    fixed = sum(1 for t in spec.inputs if not t.name.startswith("past."))
    if fixed < len(shapes):  # a decoder's ``*past`` is one argument of the wrapper
        return (*shapes[:fixed], tuple(shapes[fixed:]))
    return tuple(shapes)
