"""Stage export, the manifest, and per-stage / end-to-end validation (issue: ONNX export)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import random_image, run_fila

from fila_export.export.exporter import export_artifacts
from fila_export.export.stages import stage_specs
from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.config import preset
from fila_export.model.reference import ReferencePipeline
from fila_export.validation.parity import validate
from runtime.compare import rel_l2
from runtime.errors import ExportError, ManifestError
from runtime.generate import SamplingParams, generate
from runtime.manifest import Manifest, sha256_file
from runtime.pipeline import FilaPipeline
from runtime.preprocess import preprocess


def test_manifest_lists_every_stage_with_spec_names(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    specs = stage_specs(preset("tiny"))
    assert list(manifest.stages) == list(specs)
    for name, spec in specs.items():
        entry = manifest.stage(name)
        assert set(entry["variants"]) == {"fp32", "fp16"}
        graph = onnx.load(str(manifest.stage_path(name)), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in graph.output] == [t.name for t in spec.outputs]
        # axis names in the graph are the spec's, so profiles can be built from either
        for value, tspec in zip(graph.input, spec.inputs, strict=True):
            dims = value.type.tensor_type.shape.dim
            assert [d.dim_param or d.dim_value for d in dims] == list(tspec.shape)
    # the portable decoder's KV layout is in its spec: time-major, (length, batch, heads, dim)
    assert manifest.spec("decoder").inputs[3].shape == ("past", "batch", 2, 16)
    assert manifest.preprocess.tile_size == 56


def test_tokenizer_files_are_the_one_source_of_template_eos_and_image_token(tiny_artifacts):
    """The manifest no longer repeats them: the pipeline reads the exported tokenizer files."""
    manifest = Manifest.load(tiny_artifacts)
    assert not {"chat_template", "eos_token_ids", "image_token_id", "kv_cache"} & set(manifest.data)
    config = json.loads((tiny_artifacts / "tokenizer_config.json").read_text())
    pipe = FilaPipeline.from_artifacts(tiny_artifacts)
    assert pipe.prompts.chat_template == config["chat_template"]
    assert pipe.eos_ids == [pipe.prompts.tokenizer.token_to_id(config["eos_token"])]
    assert pipe.image_token_id == manifest.model["image_token_index"]


def test_fp16_graphs_are_strongly_typed_with_fp32_norms(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    model = onnx.load(str(manifest.stage_path("vit.0", "fp16")))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert lns and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in lns)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_validate_passes_fp32_and_fp16(tiny_artifacts, tiny_checkpoint, tmp_path):
    report = validate(tiny_artifacts, tiny_checkpoint, tokens=32)
    assert report.passed, report.markdown()
    assert {s.stage for s in report.stages} == set(stage_specs(preset("tiny")))
    assert all(s.rel_l2 <= 1e-4 for s in report.stages)
    assert report.tokens_equal == report.tokens_compared > 0
    fp16 = validate(tiny_artifacts, tiny_checkpoint, precision="fp16", tokens=8, max_images=1)
    assert all(s.passed and s.precision == "fp16" for s in fp16.stages), fp16.markdown()


def test_fused_and_modular_vision_agree(tiny_artifacts):
    fused = FilaPipeline.from_artifacts(tiny_artifacts, vision="fused")
    modular = FilaPipeline.from_artifacts(tiny_artifacts, vision="modular")
    for size in [(40, 30), (90, 150), (150, 60), (200, 200)]:
        image = preprocess(random_image(*size), fused.preprocess_config)
        a, b = fused.run_vision(image), modular.run_vision(image)
        assert a.shape == b.shape
        assert rel_l2(a, b) <= 1e-5


@pytest.mark.parametrize(
    "size", [(40, 30), (50, 100), (200, 200)], ids=["1-crop", "2-crops", "4-crops"]
)
def test_32_greedy_tokens_for_each_crop_count(tiny_artifacts, tiny_checkpoint, size):
    """Sizes that make the grid choose 1, 2 and 4 sub-images (2, 3 and 5 tiles with the base)."""
    ref = ReferencePipeline.from_checkpoint(tiny_checkpoint)
    pipe = FilaPipeline.from_artifacts(tiny_artifacts)
    image = random_image(*size, seed=11)
    tiles = preprocess(image, pipe.preprocess_config).pixel_values.shape[0]
    assert tiles == {(40, 30): 2, (50, 100): 3, (200, 200): 5}[size]
    want = ref.generate([image], "Read it.", max_new_tokens=32).token_ids
    got = pipe.generate(image, "Read it.", max_new_tokens=32).token_ids
    assert len(want) > 0 and got == want


def test_left_padded_batch_of_two(tiny_artifacts, tiny_checkpoint):
    """Two prompts of different lengths in one left-padded batch give each prompt's own tokens."""
    model, config = load_checkpoint(tiny_checkpoint)
    pipe = FilaPipeline.from_artifacts(tiny_artifacts, decoder="portable")
    rows = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52]]
    expected = []
    for ids in rows:
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, eos_token_id=None)
        expected.append(out[0].tolist())
    width = max(map(len, rows))
    ids = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    decoder = pipe.new_decoder(max_len=width + 32, batch=2)
    out = generate(decoder, pipe.embed, pipe.embed(ids), mask, 32, SamplingParams())
    assert out.token_ids == expected
    assert len(set(expected[0])) > 4


def test_tampered_weights_fail_validation_and_name_the_stage(
    tiny_artifacts, tiny_checkpoint, tmp_path
):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    manifest = Manifest.load(art)
    path = manifest.stage_path("projector")
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if len(i.dims) == 2)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    # without updating the manifest: refused as tampered
    r = run_fila("validate", "--artifacts", str(art), "--checkpoint", str(tiny_checkpoint))
    assert r.returncode == 1 and "does not match the manifest" in r.stderr
    assert "Traceback" not in r.stderr
    # with the hash updated (an export of other weights): validation finds the stage
    manifest.stages["projector"]["variants"]["fp32"]["sha256"] = sha256_file(path)
    manifest.save()
    r = run_fila(
        "validate",
        "--artifacts",
        str(art),
        "--checkpoint",
        str(tiny_checkpoint),
        "--max-images",
        "1",
        "--json",
        str(tmp_path / "v.json"),
    )
    assert r.returncode == 1
    report = json.loads((tmp_path / "v.json").read_text())
    failed = {s["stage"] for s in report["stages"] if not s["passed"]}
    assert failed == {"projector"}
    assert "| projector | fp32 |" in r.stdout and "FAIL" in r.stdout


def test_validate_cli_passes_on_good_export(tiny_artifacts, tiny_checkpoint):
    r = run_fila(
        "validate",
        "--artifacts",
        str(tiny_artifacts),
        "--checkpoint",
        str(tiny_checkpoint),
        "--max-images",
        "1",
        "--tokens",
        "8",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "**PASS**" in r.stdout


def test_export_cli_errors_are_one_line(tiny_checkpoint, tiny_artifacts, tmp_path):
    cases = [
        (["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o1")], "does not exist"),
        (["--checkpoint", str(tiny_checkpoint), "--out", str(tiny_artifacts)], "pass --force"),
        (
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "o2"),
                "--stages",
                "bogus",
            ],
            "unknown stage(s) bogus",
        ),
    ]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases.append(
        (
            ["--checkpoint", str(tiny_checkpoint), "--out", str(blocker / "out")],
            "choose a writable --out",
        )
    )
    for args, message in cases:
        r = run_fila("export", *args)
        assert r.returncode == 1, args
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import fila_export.export.exporter as export_mod

    calls = []

    def failing(model, spec, *args):
        calls.append(spec.name)
        if len(calls) == 2:
            raise ExportError("simulated failure")
        return real(model, spec, *args)

    real = export_mod.export_stage
    monkeypatch.setattr(export_mod, "export_stage", failing)
    with pytest.raises(ExportError):
        export_artifacts(
            tiny_checkpoint, tmp_path / "out", stages=["embed", "projector"], progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_partial_stage_export(tiny_checkpoint, tmp_path):
    m = export_artifacts(tiny_checkpoint, tmp_path / "out", stages=["embed"], progress=False)
    assert list(m.stages) == ["embed"]
    with pytest.raises(ManifestError, match="stage 'decoder' is not in this export"):
        m.stage("decoder")


def test_manifest_refuses_paths_outside_and_bad_format(tiny_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    data = json.loads((art / "manifest.json").read_text())
    data["stages"]["embed"]["variants"]["fp32"]["file"] = "../../etc/passwd"
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="outside the artifact folder"):
        Manifest.load(art).stage_path("embed")
    with pytest.raises(ManifestError, match="outside the artifact folder"):
        Manifest.load(art).verify()
    data["format"] = 99
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format 99"):
        Manifest.load(art)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(art)
