"""The stage specs of a model, declared once as data (``runtime.spec`` types): what each exported
graph takes and returns, and its dynamic axes.

The exporter (dynamic shapes), the TensorRT builder (optimization profiles), the runtime and the
validator all read these, via ``manifest.json``. Grid bookkeeping lives in the graphs: a CVFM
graph derives the tile grid from its ConvNeXt map's shape (rows = height / window), so the runtime
only feeds tensors; the LLaVA-NeXT packing (unpad + image_newline) is a gather done by the runtime
with the image's packing index, since it depends on the original image size, which no graph sees.
"""

from __future__ import annotations

from fila_export.model.config import FilaConfig, preprocess_config
from runtime.errors import ConfigError
from runtime.generate import DecoderShape
from runtime.spec import AxisRange, StageSpec, TensorSpec

GQA_TYPES = ("llama", "mistral", "qwen2")
NOT_VISION = ("vision", "embed", "decoder", "decoder_gqa")


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


def decoder_axes(max_context: int, max_batch: int) -> dict[str, AxisRange]:
    return {
        "batch": AxisRange(1, 1, max_batch),
        "seq": AxisRange(1, min(512, max_context), max_context),
        "past": AxisRange(0, min(512, max_context - 1), max_context - 1),
        "total": AxisRange(1, min(513, max_context), max_context),
    }


def stage_specs(
    config: FilaConfig, max_context: int | None = None, max_batch: int = 1
) -> dict[str, StageSpec]:
    """Every stage of this model, in execution order (the modular vision chain first)."""
    max_context = max_context or min(config.max_position_embeddings, 4096)
    if max_context > config.max_position_embeddings:
        raise ConfigError(
            f"--max-context {max_context} is past the model's max_position_embeddings "
            f"({config.max_position_embeddings}); use at most that"
        )
    specs = vision_specs(config)
    specs |= text_specs(config, max_context, max_batch)
    return specs


def vision_specs(config: FilaConfig) -> dict[str, StageSpec]:
    """The modular chain (convnext, vit.k / cvfm.k, projector) and the fused ``vision`` graph."""
    t, n = config.tile_size, config.tokens_per_side
    d_vit, d_text = config.vision["hidden_size"], config.text["hidden_size"]
    vax = vision_axes(config)
    hidden = TensorSpec("hidden", "float32", ("tiles", 1 + n * n, d_vit))
    hidden_out = TensorSpec("hidden_out", "float32", hidden.shape)
    pixels = TensorSpec("pixel_values", "float32", ("tiles", 3, t, t))
    g = config.global_tile_size if config.has_convnext else 0
    global_view = TensorSpec("global_view", "float32", (1, 3, f"{g}*rows", f"{g}*cols"))
    specs: dict[str, StageSpec] = {}
    maps = []
    if config.has_convnext:
        maps = [
            TensorSpec(f"stage{i}", "float32", (1, dim, f"{w}*rows", f"{w}*cols"))
            for i, (dim, w) in enumerate(
                zip(config.convnext.dims, config.cvfm_windows(), strict=True)
            )
        ]
        specs["convnext"] = StageSpec("convnext", [global_view], maps, vax, "global view -> maps")
    for k, (start, end) in enumerate(config.vit_segments()):
        if end > start or k == 0:
            embed = " (with patch embedding)" if k == 0 else ""
            specs[f"vit.{k}"] = StageSpec(
                f"vit.{k}",
                [pixels if k == 0 else hidden],
                [hidden_out],
                vax,
                f"ViT layers {start + 1}..{end}{embed}",
            )
        if k < len(maps):
            specs[f"cvfm.{k}"] = StageSpec(
                f"cvfm.{k}", [hidden, maps[k]], [hidden_out], vax, f"CVFM after ViT layer {end}"
            )
    features = TensorSpec("image_features", "float32", ("tiles", n * n, d_text))
    specs["projector"] = StageSpec(
        "projector", [hidden], [features], vax, "feature select + mlp2x_gelu"
    )
    specs["vision"] = StageSpec(
        "vision",
        [pixels, global_view] if config.has_convnext else [pixels],
        [features],
        vax,
        "fused hybrid encoder + projector (deployment graph)",
    )
    return specs


def text_specs(config: FilaConfig, max_context: int, max_batch: int) -> dict[str, StageSpec]:
    """``embed``, the portable ``decoder`` and (for the LLMs it supports) ``decoder_gqa``."""
    d_text = config.text["hidden_size"]
    axes = decoder_axes(max_context, max_batch)
    specs = {
        "embed": StageSpec(
            "embed",
            [TensorSpec("input_ids", "int64", ("batch", "seq"))],
            [TensorSpec("inputs_embeds", "float32", ("batch", "seq", d_text))],
            axes,
            "token ids -> embeddings",
        ),
        "decoder": StageSpec(
            "decoder",
            [
                TensorSpec("inputs_embeds", "float32", ("batch", "seq", d_text)),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ("batch", "seq")),
                *kv_tensors(config, "past", ("past", "batch")),
            ],
            [
                TensorSpec("logits", "float32", ("batch", config.vocab_size)),
                *kv_tensors(config, "present", ("seq", "batch")),
            ],
            axes,
            "one graph for prefill (past length 0) and decode; time-major KV, new positions out",
        ),
    }
    if gqa_unsupported_reason(config.text) is None:
        specs["decoder_gqa"] = gqa_decoder_spec(config, max_context, max_batch)
    return specs


def kv_tensors(config: FilaConfig, prefix: str, leading: tuple) -> list[TensorSpec]:
    """``{prefix}.{layer}.key/value`` of every layer; the portable graph's are time-major,
    (length, batch, kv_heads, head_dim)."""
    shape = DecoderShape.from_text_config(config.text)
    dims = (*leading, shape.kv_heads, shape.head_dim)
    return [
        TensorSpec(f"{prefix}.{i}.{kv}", "float32", dims)
        for i in range(shape.num_layers)
        for kv in ("key", "value")
    ]


def gqa_decoder_spec(config: FilaConfig, max_context: int, max_batch: int = 1) -> StageSpec:
    """The ONNX Runtime decoder (``gqa_decoder``): one shared cache buffer per layer, (batch,
    kv_heads, total, head_dim), read and written in place; ``total`` is its length. Each row has
    its own length (``seqlens_k``, ``position_ids``): a server steps requests of different lengths
    together. Multi-token steps after a prefix (prefill, chunked prefill) run one row at a time,
    on that row's slice of the buffers (ONNX Runtime's kernel takes them for batch 1 only)."""
    shape = DecoderShape.from_text_config(config.text)
    axes = decoder_axes(max_context, max_batch)
    del axes["past"]
    cache = ("batch", shape.kv_heads, "total", shape.head_dim)
    return StageSpec(
        "decoder_gqa",
        [
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", config.text["hidden_size"])),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            TensorSpec("seqlens_k", "int32", ("batch",)),
            TensorSpec("total_sequence_length", "int32", ()),
            *[TensorSpec(t.name, "float32", cache) for t in kv_tensors(config, "past", ())],
        ],
        [
            TensorSpec("logits", "float32", ("batch", config.vocab_size)),
            *[TensorSpec(t.name, "float32", cache) for t in kv_tensors(config, "present", ())],
        ],
        axes,
        "decoder for ONNX Runtime: GroupQueryAttention on a shared in-place KV buffer",
        backends=("onnxruntime",),
    )


LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def gqa_unsupported_reason(text_config: dict) -> str | None:
    """Why this LLM cannot use the GQA graph, or None when it can."""
    kind = text_config.get("model_type", "llama")
    if kind not in GQA_TYPES:
        return f"model_type {kind!r} (supported: {', '.join(GQA_TYPES)})"
    rope = text_config.get("rope_scaling") or text_config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in LENGTH_DEPENDENT_ROPE:  # the graph's rotary tables are computed once
        return f"rope scaling {rope_type!r} (its angles depend on the sequence length)"
    if text_config.get("sliding_window") and text_config.get("use_sliding_window", True):
        window = text_config["sliding_window"]
        if window < text_config.get("max_position_embeddings", 0):
            return f"sliding-window attention ({window})"
    return None


def vision_chain(config: FilaConfig) -> list[str]:
    """The modular stages in execution order (what the fused ``vision`` graph computes)."""
    return [s for s in vision_specs(config) if s not in NOT_VISION]
