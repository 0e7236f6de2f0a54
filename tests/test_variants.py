"""Choosing what runs: a stage's variant from a precision spec, and the decoder graph for a
backend, both from what the manifest declares."""

from __future__ import annotations

import copy

import pytest
from conftest import run_fila

from runtime.errors import FilaError, ManifestError
from runtime.manifest import Manifest
from runtime.variants import PrecisionError, PrecisionSpec, choose_decoder, choose_variant

pytestmark = pytest.mark.board

VISION = ["fp32", "fp16", "int8"]
DECODER = ["fp32", "fp16", "w8", "w4"]


def pick(text: str, stage: str, variants: list[str]) -> str:
    return PrecisionSpec.parse(text).variant(stage, variants)


def test_precision_specs():
    assert pick("fp16", "vision", VISION) == "fp16" and pick("fp16", "decoder", DECODER) == "fp16"
    assert pick("int8", "decoder", DECODER) == "fp32"
    assert (
        pick("int8,w4", "vit.0", VISION) == "int8" and pick("int8,w4", "decoder", DECODER) == "w4"
    )
    assert pick("int8,w4", "embed", ["fp32", "fp16"]) == "fp32"
    named = "vision=int8,decoder=w4"
    assert pick(named, "vision", VISION) == "int8" and pick(named, "cvfm.2", VISION) == "int8"
    assert pick(named, "decoder_gqa", DECODER) == "w4" and pick(named, "embed", ["fp32"]) == "fp32"
    mixed = "fp16,decoder=w4,vit.0=fp32"
    assert pick(mixed, "vit.0", VISION) == "fp32" and pick(mixed, "vit.1", VISION) == "fp16"
    assert (
        pick(mixed, "decoder", DECODER) == "w4" and pick(mixed, "embed", ["fp32", "fp16"]) == "fp16"
    )
    with pytest.warns(UserWarning, match="no w4 variant"):
        assert pick("decoder=w4", "decoder", ["fp32"]) == "fp32"
    assert (
        pick("int8+w4", "vit.0", VISION) == "int8" and pick("int8+w4", "decoder", DECODER) == "w4"
    )
    with pytest.raises(FilaError, match="STAGE=PRECISION"):
        PrecisionSpec.parse("decoder=")


def test_names_that_match_nothing_in_the_export_are_errors(tiny_artifacts):
    """A typo used to run fp32 with exit 0: now it names what the export has."""
    manifest = Manifest.load(tiny_artifacts)  # fp32 + fp16, no int8 / w4
    with pytest.raises(PrecisionError, match=r"'int9' is not a variant .* \(it has fp16, fp32\)"):
        choose_variant(manifest, "int9", "vision")
    with pytest.raises(PrecisionError, match="vison, which is not a stage"):
        choose_variant(manifest, "vison=fp16", "vision")
    with pytest.raises(PrecisionError, match="no decoder stage has a w4 variant"):
        choose_variant(manifest, "decoder=w4", "decoder")
    assert choose_variant(manifest, "fp16", "vision") == "fp16"
    args = ["--image", "x.png", "--prompt", "Hi", "--precision", "int9"]
    r = run_fila("run", "--artifacts", str(tiny_artifacts), *args)
    assert r.returncode == 1 and "'int9' is not a variant" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_decoder_graph_comes_from_the_backends_the_manifest_declares(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    assert choose_decoder(manifest, "onnxruntime") == "decoder_gqa"
    assert choose_decoder(manifest, "tensorrt") == "decoder"
    assert choose_decoder(manifest, "onnxruntime", "portable") == "decoder"
    with pytest.raises(FilaError, match="runs on onnxruntime only"):
        choose_decoder(manifest, "tensorrt", "gqa")
    # a manifest that says the GQA graph runs on TensorRT too is believed (no hard-coded rule)
    edited = Manifest(manifest.folder, copy.deepcopy(manifest.data))
    edited.stages["decoder_gqa"]["backends"] = ["onnxruntime", "tensorrt"]
    assert choose_decoder(edited, "tensorrt", "gqa") == "decoder_gqa"
    del edited.stages["decoder"]
    assert choose_decoder(edited, "tensorrt") == "decoder_gqa"
    edited.stages["decoder_gqa"]["backends"] = ["onnxruntime"]
    with pytest.raises(ManifestError, match="no decoder graph of this export runs on tensorrt"):
        choose_decoder(edited, "tensorrt")
