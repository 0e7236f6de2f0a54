"""The ONNX Runtime decoder (``decoder_gqa``: GroupQueryAttention on a shared in-place cache)
against transformers' own decoder, the portable graph and the PyTorch reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, random_image

from fila_export.export.gqa_decoder import GqaDecoderStage
from fila_export.export.modules import DecoderStage
from fila_export.export.stages import gqa_unsupported_reason, stage_specs
from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.config import preset
from fila_export.model.reference import ReferencePipeline
from runtime.errors import FilaError, ManifestError
from runtime.pipeline import FilaPipeline
from runtime.variants import choose_decoder

LOGITS_ATOL = 1e-4


def _both(model, embeds: torch.Tensor, steps: int = 3):
    """Prefill then ``steps`` one-token steps through the portable wrapper (transformers' layers
    and cache) and the GQA wrapper (hand-run layers, custom op); logits of every call."""
    cfg = model.config.text
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or heads, cfg["hidden_size"] // heads
    portable, gqa = DecoderStage(model).eval(), GqaDecoderStage(model).eval()
    seq = embeds.shape[1]
    total = seq + steps
    past = [torch.zeros(0, 1, kv, hd) for _ in range(2 * layers)]
    cache = [torch.zeros(1, kv, total, hd) for _ in range(2 * layers)]
    out_a, out_b = [], []
    start = 0
    with torch.no_grad():
        for n in [seq, *[1] * steps]:
            x = embeds[:, start : start + n] if start < seq else embeds[:, -1:] * 0.5
            pos = torch.arange(start, start + n)[None]
            a = portable(x, torch.ones(1, start + n, dtype=torch.long), pos, *past)
            past = [torch.cat([p, new]) for p, new in zip(past, a[1:], strict=True)]
            lens = torch.tensor([start + n - 1], dtype=torch.int32)
            b = gqa(x, pos, lens, torch.tensor(start + n, dtype=torch.int32), *cache)
            cache = list(b[1:])
            out_a.append(a[0])
            out_b.append(b[0])
            start += n
    return out_a, out_b, past, cache


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_gqa_wrapper_equals_transformers_decoder(tmp_path, kind):
    """The hand-run layer loop gives transformers' logits and K/V, prefill and decode."""
    text = dict(preset("tiny").text, model_type=kind)
    folder = make_checkpoint(tmp_path / kind, seed=3, text=text)
    model, _ = load_checkpoint(folder)
    embeds = torch.randn(1, 7, text["hidden_size"], generator=torch.Generator().manual_seed(0))
    want, got, past, cache = _both(model, embeds)
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max().item() <= LOGITS_ATOL
    for p, c in zip(past, cache, strict=True):  # time-major vs head-major, same numbers
        assert torch.allclose(p.permute(1, 2, 0, 3), c, atol=1e-5)


def test_unsupported_llms_get_no_gqa_stage():
    assert gqa_unsupported_reason({"model_type": "gemma"}) is not None
    windowed = {"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 256}
    assert "sliding" in gqa_unsupported_reason(windowed)
    text = dict(preset("tiny").text, model_type="mistral", sliding_window=64)
    cfg = dataclasses.replace(preset("tiny"), text=text)
    assert "decoder_gqa" not in stage_specs(cfg, max_context=64)
    assert "decoder_gqa" in stage_specs(preset("tiny"), max_context=64)


def test_pipelines_give_the_reference_tokens(tiny_artifacts, tiny_checkpoint):
    ref = ReferencePipeline.from_checkpoint(tiny_checkpoint)
    gqa = FilaPipeline.from_artifacts(tiny_artifacts)
    portable = FilaPipeline.from_artifacts(tiny_artifacts, decoder="portable")
    assert (gqa.decoder_stage, portable.decoder_stage) == ("decoder_gqa", "decoder")
    for seed, size in enumerate([(60, 90), (130, 40), (100, 100)]):
        image = random_image(*size, seed=seed)
        want = ref.generate([image], "What is it?", max_new_tokens=32).token_ids
        assert gqa.generate(image, "What is it?", max_new_tokens=32).token_ids == want
        assert portable.generate(image, "What is it?", max_new_tokens=32).token_ids == want


def test_chunked_prefill_equals_one_prefill(tiny_artifacts):
    """The shared cache continues from any filled length (a second turn appends a chunk)."""
    pipe = FilaPipeline.from_artifacts(tiny_artifacts)
    ids = np.arange(4, 20, dtype=np.int64)[None]
    embeds = pipe.embed(ids)
    whole = pipe.new_decoder(20)
    want = whole.prefill(embeds, np.ones_like(ids)).copy()
    parts = pipe.new_decoder(20)
    parts.prefill(embeds[:, :10], np.ones((1, 10), np.int64))
    got = parts._run(embeds[:, 10:], np.arange(10, 16)[None])
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(
        parts.cache.buffer[..., :16, :], whole.cache.buffer[..., :16, :], atol=1e-5
    )


def test_padded_rows_and_wrong_backend_are_refused(tiny_artifacts):
    pipe = FilaPipeline.from_artifacts(tiny_artifacts)
    dec = pipe.new_decoder(16)
    ids = np.array([[0, 5, 6]], dtype=np.int64)
    with pytest.raises(FilaError, match="portable"):
        dec.prefill(pipe.embed(ids), np.array([[0, 1, 1]]))
    with pytest.raises(FilaError, match="onnxruntime only"):
        choose_decoder(pipe.manifest, "tensorrt", "gqa")
    assert choose_decoder(pipe.manifest, "tensorrt") == "decoder"
    with pytest.raises(FilaError, match="auto, gqa, portable"):
        choose_decoder(pipe.manifest, "onnxruntime", "fast")
    data = dict(pipe.manifest.data, stages=dict(pipe.manifest.stages))
    del data["stages"]["decoder_gqa"]
    old = type(pipe.manifest)(pipe.manifest.folder, data)
    with pytest.raises(ManifestError, match="no decoder_gqa"):
        choose_decoder(old, "onnxruntime", "gqa")
    assert choose_decoder(old, "onnxruntime") == "decoder"


def test_trt_check_skips_the_onnxruntime_only_graph(tiny_artifacts):
    from fila_export.tensorrt.check import check_artifacts

    report = check_artifacts(tiny_artifacts, precisions=["fp32"])
    assert report.skipped == ["decoder_gqa"]
    assert ("decoder", "fp32") in report.graphs
    assert not any(stage == "decoder_gqa" for stage, _ in report.graphs)


def test_norms_and_rotary_run_as_onnx_runtimes_fused_kernels(tiny_artifacts):
    """RMSNorm reaches ORT's optimizer in the form it fuses, rotary as its RotaryEmbedding: a
    step runs those kernels, not the dozen elementwise nodes per layer they replace."""
    from benchmarks.decode_profile import step_profile

    ops = step_profile(tiny_artifacts, "fp32", context=8, steps=2, threads=1)["ms_by_op"]
    assert {"SimplifiedLayerNormalization", "RotaryEmbedding", "GroupQueryAttention"} <= set(ops)
    assert not {"Reciprocal", "Sqrt", "Neg", "Pow"} & set(ops)


def test_cache_bound_once_gives_the_logits_of_binding_every_step(tiny_artifacts):
    """The cache's buffers are bound to the session once (``bind_fixed``); a runner
    without that (binding all 2 x layers buffers every step) must see the same logits."""

    class EveryStep:
        def __init__(self, runner):
            self.runner, self.inputs = runner, runner.inputs

        def infer_into(self, feeds, outputs, release=False):
            self.runner.infer_into(feeds, outputs, release)

    pipe = FilaPipeline.from_artifacts(tiny_artifacts, vision="none")
    runner = pipe.runners["decoder_gqa"]
    ids = np.arange(4, 14, dtype=np.int64)[None]
    logits = {}
    for name, r in {"once": runner, "every": EveryStep(runner)}.items():
        decoder = pipe.new_decoder(20, runner=r)
        out = [decoder.prefill(pipe.embed(ids), np.ones_like(ids)).copy()]
        for token in (5, 9, 11):
            out.append(decoder.decode_one_token(pipe.embed(np.array([[token]]))).copy())
        logits[name] = np.stack(out)
    assert pipe.new_decoder(4).cache.binding is None  # made at the first run
    np.testing.assert_array_equal(logits["once"], logits["every"])
