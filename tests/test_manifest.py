"""The manifest checks what a load opens, once, and ``fila verify`` checks everything."""

from __future__ import annotations

import pytest
from conftest import copy_export, random_image, run_fila

from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.pipeline import FilaPipeline

pytestmark = pytest.mark.board


@pytest.fixture
def art(tiny_artifacts, tmp_path):
    return copy_export(tiny_artifacts, tmp_path / "art")


def test_a_load_hashes_only_the_files_it_opens_and_each_once(art):
    assert Manifest.load(art).hashed == []  # reading the manifest hashes nothing
    pipe = FilaPipeline.from_artifacts(art)  # fp32: vision, embed, decoder_gqa
    hashed = pipe.manifest.hashed
    opened = {"vision.onnx", "embed.onnx", "decoder_gqa.onnx", "tokenizer.json"}
    opened |= {"tokenizer_config.json", "image_newline.npy", "weights.fp32.data"}
    assert set(hashed) == opened and len(hashed) == len(opened)
    assert not any(".fp16." in name for name in hashed)  # the variants it does not run
    pipe.generate(random_image(60, 90), "Hi", max_new_tokens=3)
    assert len(hashed) == len(opened)  # nothing hashed again


def test_a_tampered_variant_stops_the_runs_that_open_it_and_fila_verify_names_it(art):
    (art / "vision.fp16.onnx").write_bytes(b"not the exported graph")
    FilaPipeline.from_artifacts(art, precision="fp32")  # never opens the fp16 graph
    with pytest.raises(ManifestError, match=r"stage vision \(fp16\): vision.fp16.onnx does not"):
        FilaPipeline.from_artifacts(art, precision="fp16", vision="fused")
    r = run_fila("verify", str(art))
    assert r.returncode == 1 and "vision.fp16.onnx does not match the manifest" in r.stderr
    assert "Traceback" not in r.stderr


def test_fila_verify_passes_on_a_good_export(tiny_artifacts):
    r = run_fila("verify", str(tiny_artifacts))
    assert r.returncode == 0, r.stderr
    assert "match manifest.json" in r.stdout
