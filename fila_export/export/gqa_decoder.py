"""The ONNX Runtime decoder: attention as ``com.microsoft.GroupQueryAttention`` on a shared cache.

The portable ``decoder`` graph (standard ONNX, what TensorRT builds) feeds the cache prefix in and
gets only the new positions out, but inside the graph ONNX Runtime then transposes the cache,
concatenates past and new, and repeats each KV head for its query group: copies that grow with the
context, about 1 GB per token at 2,048 positions on ``small``. ``decoder_gqa`` replaces the
attention with ORT's GroupQueryAttention kernel (what onnxruntime-genai runs): the KV cache is one
buffer per layer, (batch, kv_heads, max_len, head_dim), bound as both ``past.*`` and ``present.*``;
the kernel writes the new positions into it and reads the prefix in place, and query groups share
their KV head without a copy. ``seqlens_k`` (position of the last token, per row) and
``total_sequence_length`` say how much of the buffer is filled. Rows are unpadded; each row may
have its own length in a one-token step (``runtime.batching``: a server decoding requests
together), while a multi-token step after a prefix runs one row. Padded batches use the portable
graph. The export checks the graph against PyTorch on one row (the eager reference below assumes
rows of one length); rows of different lengths are checked against each row decoded alone
(tests/test_batching.py).

In PyTorch the attention is a custom op whose eager implementation is ordinary SDPA over the same
buffer, so parity checks compare the graph against this module; the exporter maps the op to the
contrib node through ``custom_translation_table``.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.generate import DecoderShape


@torch.library.custom_op("fila::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of the contrib op (unpadded rows: every row has the same length)."""
    batch, seq, _ = query.shape
    head_dim = past_key.shape[-1]
    total = int(total_sequence_length)
    past = total - seq
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, past:total] = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    present_value[:, :, past:total] = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2)
    visible = torch.arange(total)[None, :] <= (past + torch.arange(seq))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        present_key[:, :, :total],
        present_value[:, :, :total],
        attn_mask=visible,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(batch, seq, -1), present_key, present_value


@group_query_attention.register_fake
def _(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    num_heads,
    kv_num_heads,
    scale,
):
    return (
        query.new_empty(query.shape),
        past_key.new_empty(past_key.shape),
        past_value.new_empty(past_value.shape),
    )


@torch.library.custom_op("fila::rotary_embedding", mutates_args=())
def rotary_embedding(
    x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> torch.Tensor:
    """Eager reference of ORT's ``RotaryEmbedding`` (non-interleaved, the whole head rotated):
    ``x`` is (batch, seq, heads * head_dim), the caches (max_positions, head_dim / 2)."""
    batch, seq, width = x.shape
    half = cos_cache.shape[-1]
    heads = x.view(batch, seq, width // (2 * half), 2 * half).float()
    cos = cos_cache[position_ids].float()[:, :, None]
    sin = sin_cache[position_ids].float()[:, :, None]
    first, second = heads[..., :half], heads[..., half:]
    out = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return out.to(x.dtype).reshape(batch, seq, width)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache):
    return x.new_empty(x.shape)


def rotary_caches(model, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, head_dim / 2) cos and sin tables from the model's own rotary embedding (its
    frequencies and any rope scaling), for ``rotary_embedding``."""
    rotary = model.language_model.model.rotary_emb
    ids = torch.arange(positions)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].to(dtype), sin[0, :, :half].to(dtype)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm (computed in fp32) as ``x / sqrt(mean(x^2) + eps) * weight``: the
    form ONNX Runtime fuses into one ``SimplifiedLayerNormalization``; the module's ``rsqrt``
    exports as Sqrt + Reciprocal, which it leaves as five nodes."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x32 / torch.sqrt(variance + norm.variance_epsilon)).to(x.dtype)


def _register_onnx_schema() -> None:
    """Describe the contrib ops to ``onnx`` (ONNX Runtime keeps its schemas to itself), so the
    exporter can emit them. The inputs and attributes the graph uses, as ORT documents them."""
    import onnx.defs as defs
    from onnx.defs import OpSchema

    int_attr, float_attr = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    ops = {  # name: (inputs as (name, "T" | "M"), outputs, M's type, attributes)
        "RotaryEmbedding": (
            [("input", "T"), ("position_ids", "M"), ("cos_cache", "T"), ("sin_cache", "T")],
            ["output"],
            "tensor(int64)",
            [("interleaved", int_attr, "0: halves")],
        ),
        "GroupQueryAttention": (
            [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T")]
            + [("past_value", "T"), ("seqlens_k", "M"), ("total_sequence_length", "M")],
            ["output", "present_key", "present_value"],
            "tensor(int32)",
            [
                ("num_heads", int_attr, "query heads"),
                ("kv_num_heads", int_attr, "KV heads"),
                ("scale", float_attr, "softmax scale"),
            ],
        ),
    }
    param = OpSchema.FormalParameter
    for name, (inputs, outputs, index_type, attributes) in ops.items():
        if defs.has(name, domain="com.microsoft"):
            continue
        schema = OpSchema(
            name,
            "com.microsoft",
            1,
            inputs=[param(n, t) for n, t in inputs],
            outputs=[param(n, "T") for n in outputs],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)"], "activations"),
                ("M", [index_type], "positions or lengths"),
            ],
            attributes=[OpSchema.Attribute(*a) for a in attributes],
        )
        defs.register_schema(schema)


def onnx_translation() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the op -> the ORT contrib node."""
    from onnxscript.values import Opset

    _register_onnx_schema()
    msft = Opset("com.microsoft", 1)

    def gqa(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
    ):
        return msft.GroupQueryAttention(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total_sequence_length,
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            scale=scale,
        )

    def rotary(x, position_ids, cos_cache, sin_cache):
        return msft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0)

    return {
        torch.ops.fila.group_query_attention.default: gqa,
        torch.ops.fila.rotary_embedding.default: rotary,
    }


class GqaDecoderStage(nn.Module):
    """Llama-family decoder layers run by hand around the custom attention op.

    The same weights as the portable graph (the transformers modules are called directly), with
    ONNX Runtime's fused forms where the CPU gains: RMSNorm written so ORT fuses it, rotary
    embeddings as its ``RotaryEmbedding`` (tables from the model's own rotary embedding);
    ``logits`` is the last position, (batch, vocab).
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.language_model
        text = model.config.text
        self.shape = DecoderShape.from_text_config(text)
        self.heads = text["num_attention_heads"]
        cos, sin = rotary_caches(model, model.config.max_position_embeddings, torch.float32)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, *past):
        body = self.lm.model
        hidden = inputs_embeds
        cos, sin = self.rotary_cos.to(hidden.dtype), self.rotary_sin.to(hidden.dtype)
        present = []
        for i, layer in enumerate(body.layers[: self.shape.num_layers]):
            attn = layer.self_attn
            x = rms_norm(layer.input_layernorm, hidden)
            q = torch.ops.fila.rotary_embedding(attn.q_proj(x), position_ids, cos, sin)
            k = torch.ops.fila.rotary_embedding(attn.k_proj(x), position_ids, cos, sin)
            out, key, value = torch.ops.fila.group_query_attention(
                q,
                k,
                attn.v_proj(x),
                past[2 * i],
                past[2 * i + 1],
                seqlens_k,
                total_sequence_length,
                self.heads,
                self.shape.kv_heads,
                float(attn.scaling),
            )
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))
            present += [key, value]
        # on a (batch, 1, hidden) slice the LM head exports as MatMul (weight-only quantizable)
        logits = self.lm.lm_head(rms_norm(body.norm, hidden[:, -1:]))[:, 0]
        return (logits, *present)
