"""The torch-free runtime: `fila run`, sampling, streaming, KV cache, bad input (issue: runtime)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, random_image, run_fila
from PIL import Image

from fila_export.model.reference import ReferencePipeline
from runtime.errors import (
    ContextOverflowError,
    ImageError,
    ManifestError,
    ParameterError,
    PromptError,
)
from runtime.generate import SamplingParams, TextStreamer, logits_to_probs, sample
from runtime.pipeline import FilaPipeline

SIZES = [(40, 30), (90, 150), (150, 60), (200, 200), (33, 170), (170, 33)]


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return FilaPipeline.from_artifacts(tiny_artifacts)


def test_fila_run_64_greedy_tokens_equal_reference(tiny_artifacts, tiny_checkpoint, tmp_path):
    ref = ReferencePipeline.from_checkpoint(tiny_checkpoint)
    for i, size in enumerate(SIZES):
        path = tmp_path / f"im{i}.png"
        random_image(*size, seed=i).save(path)
        want = ref.generate([path], "What is in the picture?", max_new_tokens=64)
        r = run_fila(
            "run",
            "--artifacts",
            str(tiny_artifacts),
            "--image",
            str(path),
            "--prompt",
            "What is in the picture?",
            "--max-new-tokens",
            "64",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["token_ids"] == want.token_ids, size
        assert result["prompt_token_ids"] == want.prompt_token_ids
        assert result["backend"] == "onnxruntime"
        assert {"ttft_s", "decode_tokens_per_s", "vision_s", "preprocess_s"} <= set(
            result["timings"]
        )
        assert r.stdout.startswith(result["text"][:5])  # streamed before the JSON line


def test_seeded_sampling_is_reproducible(pipe):
    image = random_image(90, 150)
    kw = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 50, "top_p": 0.95}
    a = pipe.generate(image, "Hi", seed=3, **kw).token_ids
    b = pipe.generate(image, "Hi", seed=3, **kw).token_ids
    c = pipe.generate(image, "Hi", seed=4, **kw).token_ids
    assert a == b and a != c


def test_sampling_filters_match_transformers():
    """top-k / top-p / temperature / repetition penalty against transformers' logits processors."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from runtime.generate import apply_repetition_penalty

    logits = np.random.default_rng(0).normal(size=(3, 100)).astype(np.float32)
    t = torch.from_numpy(logits)
    ids = torch.zeros(3, 1, dtype=torch.long)
    hf = TemperatureLogitsWarper(0.7)(ids, t)
    hf = TopKLogitsWarper(20)(ids, hf)
    hf = TopPLogitsWarper(0.8)(ids, hf)
    want = torch.softmax(hf, -1).numpy()
    got = logits_to_probs(logits, 0.7, top_k=20, top_p=0.8)
    np.testing.assert_allclose(got, want, atol=1e-6)
    seen = [[1, 5, 5], [2], []]
    hist = torch.tensor([[1, 5, 5], [2, 2, 2], [0, 0, 0]])
    want_pen = RepetitionPenaltyLogitsProcessor(1.3)(hist, t.clone()).numpy()
    got_pen = apply_repetition_penalty(logits, [*seen[:2], [0]], 1.3)
    np.testing.assert_allclose(got_pen, want_pen, atol=1e-6)
    greedy = sample(logits, SamplingParams(), np.random.default_rng(0))
    assert greedy.tolist() == logits.argmax(-1).tolist()


def test_streaming_is_utf8_safe():
    """A character split over two tokens is emitted only when complete."""
    from fila_export.model.tokenizer import build_tokenizer

    tok = build_tokenizer(300)
    ids = tok.encode("ok é€ done").ids
    pieces: list[str] = []
    streamer = TextStreamer(lambda x: tok.decode(x, skip_special_tokens=True), pieces.append)
    for t in ids:
        streamer.push(t)
    streamer.flush()
    assert "".join(pieces) == "ok é€ done"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_and_max_tokens(pipe):
    image = random_image(90, 150)
    full = pipe.generate(image, "Hi", max_new_tokens=20)
    assert len(full.token_ids) == 20
    # a stop string from the middle of the answer, never blank (the check must always run)
    start = next(i for i in range(5, len(full.text) - 2) if full.text[i : i + 3].strip())
    stop = full.text[start : start + 3]
    cut = pipe.generate(image, "Hi", max_new_tokens=20, stop=[stop])
    assert stop not in cut.text and len(cut.token_ids) < 20
    assert full.text.startswith(cut.text)


def test_image_sources_give_the_same_answer(pipe, tmp_path):
    image = random_image(90, 150)
    path = tmp_path / "a.png"
    image.save(path)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    answers = {
        tuple(pipe.generate(src, "Hi", max_new_tokens=8).token_ids)
        for src in (path, str(path), buf.getvalue(), image, np.asarray(image))
    }
    assert len(answers) == 1


@pytest.mark.parametrize("kind", ["portable", "gqa"])
def test_kv_cache_is_allocated_once(tiny_artifacts, kind):
    pipe = FilaPipeline.from_artifacts(tiny_artifacts, decoder=kind)
    decoder = pipe.new_decoder(max_len=40)
    assert decoder.shared == (kind == "gqa")
    buffer = decoder.cache.buffer
    ids = np.array([[1, 20, 21, 22]], dtype=np.int64)
    decoder.prefill(pipe.embed(ids), np.ones_like(ids))
    for _ in range(5):
        decoder.decode_one_token(pipe.embed(np.array([[30]], dtype=np.int64)))
    assert decoder.cache.buffer is buffer and decoder.cache.length == 9
    time_axis = buffer if kind == "portable" else np.moveaxis(buffer, 4, 2)
    filled = np.abs(time_axis[:, :, :9]).reshape(-1, 9, *time_axis.shape[3:]).sum(axis=(0, 2, 3, 4))
    assert np.all(filled > 0) and np.abs(time_axis[:, :, 9:]).sum() == 0


def test_multiple_images_per_prompt(pipe, tiny_checkpoint):
    ref = ReferencePipeline.from_checkpoint(tiny_checkpoint)
    images = [random_image(90, 150, seed=1), random_image(150, 60, seed=2)]
    want = ref.generate(images, "Compare them.", max_new_tokens=16).token_ids
    assert pipe.generate(images, "Compare them.", max_new_tokens=16).token_ids == want


def test_raw_prompt_keeps_the_placeholder_where_written(pipe):
    text = pipe.prompts.format("Look: <image> what?", raw=True)
    assert text == "Look: <image> what?"
    assert pipe.prompts.format("what?", raw=True) == "<image>\nwhat?"


# --- bad input ----------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_raise_clear_errors_and_the_session_survives(pipe, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    truncated = _png_bytes(random_image(64, 64))[:200]
    for source, message in [(text_file, "not a readable image"), (truncated, "truncated")]:
        with pytest.raises(ImageError, match=message):
            pipe.generate(source, "Hi", max_new_tokens=4)
    # the same pipeline still answers afterwards
    assert len(pipe.generate(random_image(50, 50), "Hi", max_new_tokens=4).token_ids) == 4


def test_decompression_bomb_refused_before_decoding(pipe):
    import struct
    import zlib

    data = bytearray(_png_bytes(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageError, match="pixels"):
        pipe.generate(bytes(data), "Hi", max_new_tokens=4)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_are_converted(pipe, mode):
    base = random_image(80, 120)
    image = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    out = pipe.generate(image, "Hi", max_new_tokens=2)
    assert len(out.token_ids) == 2


def test_exif_rotated_jpeg_is_upright(pipe, tmp_path):
    from runtime.image_io import load_image

    image = random_image(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (40, 100)


def test_empty_prompt(pipe):
    with pytest.raises(PromptError, match="prompt is empty"):
        pipe.generate(random_image(50, 50), "   ")


def test_context_overflow_refused_before_any_model_runs(pipe):
    calls = []
    for runner in pipe.runners.values():
        runner.infer = lambda feeds, _r=runner: calls.append(_r.name)
    with pytest.raises(ContextOverflowError, match=r"\d+ over the context of \d+"):
        pipe.generate(random_image(50, 50), "word " * 5000, max_new_tokens=8)
    assert calls == []


def test_tampered_artifacts_refused(tiny_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    onnx_file = art / "decoder_gqa.onnx"  # the decoder ONNX Runtime opens
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="decoder_gqa.*does not match the manifest"):
        FilaPipeline.from_artifacts(art)
    r = run_fila(
        "run",
        "--artifacts",
        str(art),
        "--image",
        "fila_export/demo/examples/photos/chelsea.jpg",
        "--prompt",
        "Hi",
    )
    assert r.returncode == 1 and "does not match the manifest" in r.stderr
    assert "Traceback" not in r.stderr


def test_runtime_imports_and_runs_without_torch(tiny_artifacts):
    """A subprocess where importing torch, transformers or timm raises."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "timm", "torchvision"):
                    raise ImportError(f"blocked {{name}}")
        sys.meta_path.insert(0, Block())
        from runtime.pipeline import FilaPipeline
        import numpy as np
        pipe = FilaPipeline.from_artifacts({str(tiny_artifacts)!r})
        out = pipe.generate(np.zeros((60, 90, 3), np.uint8), "Hi", max_new_tokens=5)
        assert len(out.token_ids) == 5
        assert not any(m.split(".")[0] in ("torch", "transformers", "timm") for m in sys.modules)
        print("ok")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_chat_multi_turn(tiny_artifacts):
    r = run_fila(
        "chat",
        "--artifacts",
        str(tiny_artifacts),
        "--image",
        "fila_export/demo/examples/photos/chelsea.jpg",
        "--max-new-tokens",
        "6",
        stdin="What is it?\nAnd the colour?\n\n",
    )
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr  # the second turn (image in the first question) answers too
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-new-tokens", "-3", "max_new_tokens must be at least 1, got -3"),
        ("--top-p", "2.5", "top_p must be in (0, 1], got 2.5"),
        ("--temperature", "-1", "temperature must be >= 0 (0 = greedy), got -1.0"),
        ("--top-k", "-2", "top_k must be a whole number >= 1"),
        ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
        ("--seed", "-1", "seed must be a whole number >= 0"),
    ],
)
def test_out_of_range_generation_parameters_are_one_line_errors(
    tiny_artifacts, option, value, message
):
    photo = "fila_export/demo/examples/photos/chelsea.jpg"
    args = ["--artifacts", str(tiny_artifacts), "--image", photo, "--prompt", "Hi", option, value]
    r = run_fila("run", *args)
    assert r.returncode == 1 and f"error: {message}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_out_of_range_parameters_are_refused_by_the_python_api_too(pipe):
    with pytest.raises(ParameterError, match="max_new_tokens must be at least 1"):
        pipe.generate(random_image(40, 40), "Hi", max_new_tokens=0)
    with pytest.raises(ParameterError, match="top_p"):
        pipe.generate(random_image(40, 40), "Hi", top_p=0.0)
    with pytest.raises(ParameterError, match="temperature"):
        SamplingParams(temperature=float("nan"))
