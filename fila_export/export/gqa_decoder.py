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


def _register_onnx_schema() -> None:
    """Describe the contrib op to ``onnx`` (ONNX Runtime keeps its schemas to itself), so the
    exporter can emit it. The inputs and attributes the graph uses, as ORT documents them."""
    import onnx.defs as defs
    from onnx.defs import OpSchema

    if defs.has("GroupQueryAttention", domain="com.microsoft"):
        return
    param = OpSchema.FormalParameter
    tensors = ["tensor(float)", "tensor(float16)"]
    schema = OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            param("query", "T"),
            param("key", "T"),
            param("value", "T"),
            param("past_key", "T"),
            param("past_value", "T"),
            param("seqlens_k", "M"),
            param("total_sequence_length", "M"),
        ],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", tensors, "activations"), ("M", ["tensor(int32)"], "lengths")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "KV heads"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
        ],
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

    return {torch.ops.fila.group_query_attention.default: gqa}


class GqaDecoderStage(nn.Module):
    """Llama-family decoder layers run by hand around the custom attention op.

    The same weights as the portable graph (the transformers modules are called directly), with
    rotary embeddings applied before the op; ``logits`` is the last position, (batch, vocab).
    """

    def __init__(self, model):
        super().__init__()
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotate = apply_rotary_pos_emb
        self.lm = model.language_model
        text = model.config.text
        self.shape = DecoderShape.from_text_config(text)
        self.heads = text["num_attention_heads"]

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, *past):
        body = self.lm.model
        batch, seq, _ = inputs_embeds.shape
        hidden = inputs_embeds
        cos, sin = body.rotary_emb(hidden, position_ids)
        present = []
        for i, layer in enumerate(body.layers[: self.shape.num_layers]):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, self.heads, self.shape.head_dim).transpose(1, 2)
            k = (
                attn.k_proj(x)
                .view(batch, seq, self.shape.kv_heads, self.shape.head_dim)
                .transpose(1, 2)
            )
            q, k = self.rotate(q, k, cos, sin)
            out, key, value = torch.ops.fila.group_query_attention(
                q.transpose(1, 2).reshape(batch, seq, -1),
                k.transpose(1, 2).reshape(batch, seq, -1),
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
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [key, value]
        # on a (batch, 1, hidden) slice the LM head exports as MatMul (weight-only quantizable)
        logits = self.lm.lm_head(body.norm(hidden[:, -1:]))[:, 0]
        return (logits, *present)
