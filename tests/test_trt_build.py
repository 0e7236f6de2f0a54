"""Optimization profiles from the manifest and the trtexec script (no TensorRT needed), and the
real engine build + parity, which needs a GPU with TensorRT (``gpu`` marker)."""

from __future__ import annotations

import re

import pytest
from conftest import run_fila

from fila_export.model.config import preprocess_config, preset
from fila_export.tensorrt.build import default_build_stages, trtexec_script
from runtime.manifest import Manifest
from runtime.profiles import select_profile, stage_profiles


def test_one_vision_profile_per_grid_pinpoint(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    grids = sorted(set(preprocess_config(preset("tiny")).grid_shapes()))
    for stage in ["vision", "convnext", "vit.0", "cvfm.2", "projector"]:
        profiles = stage_profiles(manifest, stage)
        assert [p.name for p in profiles] == [f"grid{r}x{c}" for r, c in grids]
    vision = stage_profiles(manifest, "vision")
    for (rows, cols), profile in zip(grids, vision, strict=True):
        lo, opt, hi = profile.shapes["pixel_values"]
        assert lo == opt == hi == (1 + rows * cols, 3, 56, 56)
        assert profile.shapes["global_view"][0] == (1, 3, 128 * rows, 128 * cols)
        # the runtime picks exactly this profile for this grid's tensors
        assert select_profile(
            vision, {"pixel_values": lo, "global_view": (1, 3, 128 * rows, 128 * cols)}
        ) == vision.index(profile)
    cvfm = stage_profiles(manifest, "cvfm.0")[grids.index((2, 2))]
    assert cvfm.shapes["stage0"][0] == (1, 8, 64, 64)  # 32-cell windows, 2x2 grid


def test_decoder_prefill_and_decode_profiles(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    prefill, decode = stage_profiles(manifest, "decoder")
    ctx = manifest.stage("decoder")["axes"]["total"]["max"]
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.shapes["past.0.key"][0][0] == prefill.shapes["past.0.key"][2][0] == 0
    assert prefill.shapes["inputs_embeds"][2][1] == ctx
    assert decode.shapes["inputs_embeds"][0][1] == decode.shapes["inputs_embeds"][2][1] == 1
    assert decode.shapes["past.0.key"][0][0] == 1 and decode.shapes["past.0.key"][2][0] == ctx - 1

    def shapes(s, p):
        return {
            "inputs_embeds": (1, s, 64),
            "attention_mask": (1, p + s),
            "position_ids": (1, s),
            "past.0.key": (p, 1, 2, 16),
        }

    assert select_profile([prefill, decode], shapes(37, 0)) == 0
    assert select_profile([prefill, decode], shapes(1, 37)) == 1


def test_trtexec_script_matches_profiles(tiny_artifacts, tmp_path):
    script = tmp_path / "build.sh"
    r = run_fila("build", "--artifacts", str(tiny_artifacts), "--emit-trtexec", str(script))
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert text == trtexec_script(tiny_artifacts, "fp16")
    manifest = Manifest.load(tiny_artifacts)
    for stage in default_build_stages(manifest):
        cmd = text.split(f"# {stage} ")[1].split("\n# ")[0]
        assert f"--onnx={stage}.fp16.onnx" in cmd and "--stronglyTyped" in cmd
        mins = re.findall(r"--minShapes=(\S+)", cmd)
        maxs = re.findall(r"--maxShapes=(\S+)", cmd)
        profiles = stage_profiles(manifest, stage)
        assert len(mins) == len(maxs) == len(profiles)
        for profile, lo, hi in zip(profiles, mins, maxs, strict=True):
            for name, (pmin, _, pmax) in profile.shapes.items():
                assert f"{name}:{'x'.join(map(str, pmin))}" in lo
                assert f"{name}:{'x'.join(map(str, pmax))}" in hi


def test_trtexec_script_for_tensorrt_8_6_sets_precision_flags(tiny_artifacts, tmp_path):
    """JetPack 6.0's trtexec has no --stronglyTyped: an fp16 graph gets --fp16 there."""
    script = tmp_path / "build.sh"
    args = ["build", "--artifacts", str(tiny_artifacts), "--emit-trtexec", str(script)]
    r = run_fila(*args, "--trt-version", "8.6")
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "--stronglyTyped" not in text and text.count("--fp16") == 3
    assert "--int8" not in text


def test_build_without_tensorrt_says_how_to_get_it(tiny_artifacts):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = run_fila("build", "--artifacts", str(tiny_artifacts))
    assert r.returncode == 1 and "TensorRT is not installed" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.gpu
def test_fp16_engines_build_load_and_match_pytorch(tiny_artifacts, tiny_checkpoint, tmp_path):
    """Real TensorRT: build fp16 engines of the tiny export, then validate them against the
    PyTorch reference: every stage TensorRT runs within the fp16 tolerance, greedy tokens
    compared, and the pipeline answers on the engines."""
    import shutil

    from conftest import random_image

    from fila_export.tensorrt.build import build_engines
    from fila_export.validation.parity import validate
    from runtime.pipeline import FilaPipeline

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    build_engines(art, "fp16", stages=["vision", "embed", "decoder"], progress=False)
    report = validate(art, tiny_checkpoint, backend="tensorrt", precision="fp16", tokens=16)
    checked = {s.stage for s in report.stages}
    assert {"vision", "embed", "decoder"} <= checked, report.markdown()
    assert all(s.passed for s in report.stages if s.stage in ("vision", "embed", "decoder"))
    assert report.tokens_compared > 0 and report.tokens_equal / report.tokens_compared > 0.5
    pipe = FilaPipeline.from_artifacts(art, backend="tensorrt", precision="fp16")
    out = pipe.generate(random_image(120, 200), "Hi", max_new_tokens=16, ignore_eos=True)
    assert len(out.token_ids) == 16
    pipe.close()
