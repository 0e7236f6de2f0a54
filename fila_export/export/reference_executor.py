"""ONNX's own reference evaluator, for parity checks of graphs ONNX Runtime's CPU provider cannot
hold within the export's memory bound.

ONNX Runtime on a CPU runs an fp16 graph's MatMuls on fp32 copies of their weights (measured: a
256 MB fp16 weight peaks at 838 MB while the session loads), so a 3 GB fp16 decoder would need
about 8 GB to be checked. ``onnx.reference.ReferenceEvaluator`` computes every node with numpy in
the graph's own types, holding one copy of the weights. The contrib ops our graphs use,
``com.microsoft.GroupQueryAttention`` and ``RotaryEmbedding``, are given here, written after ONNX
Runtime's documentation (unpadded rows: every row has the same length; rotary non-interleaved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx.reference.op_run import OpRun


class GroupQueryAttention(OpRun):
    op_domain = "com.microsoft"

    def _run(
        self,
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        num_heads=None,
        kv_num_heads=None,
        scale=None,
        **_,
    ):
        batch, seq, _ = query.shape
        head_dim = past_key.shape[-1]
        total = int(total_sequence_length)
        past = total - seq
        present_key, present_value = past_key.copy(), past_value.copy()
        present_key[:, :, past:total] = _heads(key, kv_num_heads, head_dim)
        present_value[:, :, past:total] = _heads(value, kv_num_heads, head_dim)
        group = num_heads // kv_num_heads
        q = _heads(query, num_heads, head_dim).astype(np.float32)
        k = np.repeat(present_key[:, :, :total], group, axis=1).astype(np.float32)
        v = np.repeat(present_value[:, :, :total], group, axis=1).astype(np.float32)
        scores = q @ k.transpose(0, 1, 3, 2) * np.float32(scale or head_dim**-0.5)
        visible = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1).astype(query.dtype)
        return out, present_key, present_value


class RotaryEmbedding(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, position_ids, cos_cache, sin_cache, interleaved=0, **_):
        """(batch, seq, heads * head_dim), each head's halves rotated by its position's angle."""
        if interleaved:
            raise NotImplementedError("interleaved rotary is not used by our graphs")
        batch, seq, width = x.shape
        half = cos_cache.shape[-1]
        heads = x.reshape(batch, seq, width // (2 * half), 2 * half).astype(np.float32)
        cos = cos_cache[position_ids].astype(np.float32)[:, :, None]
        sin = sin_cache[position_ids].astype(np.float32)[:, :, None]
        first, second = heads[..., :half], heads[..., half:]
        out = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
        return (out.reshape(batch, seq, width).astype(x.dtype),)


def _heads(x: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    batch, seq, _ = x.shape
    return x.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)


def run_reference(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph's outputs as ONNX's reference evaluator computes them. External weights are
    memory-mapped and fed as inputs: the evaluator would otherwise copy each one it loads."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    weights = {}
    for init in list(model.graph.initializer):
        where = {e.key: e.value for e in init.external_data}
        if "location" not in where:
            continue
        weights[init.name] = np.memmap(
            path.parent / where["location"],
            dtype=helper.tensor_dtype_to_np_dtype(init.data_type),
            mode="r",
            offset=int(where.get("offset", 0)),
            shape=tuple(init.dims),
        )
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        )
        model.graph.initializer.remove(init)
    evaluator = ReferenceEvaluator(model, new_ops=[GroupQueryAttention, RotaryEmbedding])
    return evaluator.run(None, {**feeds, **weights})
