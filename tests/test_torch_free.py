"""The verbs a board runs work with torch, transformers and timm unimportable; a verb that needs
them says in one line which extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, copy_export, run_fila, serving

pytestmark = pytest.mark.board
BLOCKER = """
import sys

BLOCKED = ("torch", "torchvision", "transformers", "timm")


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


sys.meta_path.insert(0, Block())
"""
PHOTO = str(ROOT / "fila_export" / "demo" / "examples" / "photos" / "chelsea.jpg")


@pytest.fixture
def fila_without_torch(tmp_path):
    """Run ``fila`` in a subprocess (and every process it spawns) where torch cannot load."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}

    def run(*args: str):
        cmd = [sys.executable, "-m", "fila_export.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    probe = run("--help")
    assert probe.returncode == 0, probe.stderr
    return run


@pytest.mark.skipif(not os.environ.get("FILA_BOARD_LEG"), reason="the board-like leg's check")
def test_the_board_leg_runs_as_a_jetpack_6_board():
    """make test-board: JetPack 6's Python, numpy 1.x, no torch (nothing here may need it)."""
    import importlib.util

    import numpy

    assert sys.version_info[:2] == (3, 10)
    assert numpy.__version__.startswith("1.")
    assert importlib.util.find_spec("torch") is None


def test_the_blocker_blocks(fila_without_torch, tmp_path):
    r = fila_without_torch("init", "--preset", "tiny", "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: fila init needs torch, which is not installed here; install it with "
        "pip install 'fila-deploy[export]'"
    )


def test_fila_run_without_torch(fila_without_torch, tiny_artifacts):
    r = fila_without_torch(
        "run",
        "--artifacts",
        str(tiny_artifacts),
        "--image",
        PHOTO,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) <= 4


def test_fila_bench_onnxruntime_without_torch(fila_without_torch, tiny_artifacts, tmp_path):
    out = tmp_path / "bench"
    r = fila_without_torch(
        "bench",
        "--artifacts",
        str(tiny_artifacts),
        "--backends",
        "onnxruntime",
        "--precisions",
        "fp32",
        "--contexts",
        "16",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--decode-steps",
        "2",
        "--answer-tokens",
        "2",
        "--rounds",
        "1",
        "--providers",
        "cpu",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "results.json").read_text())
    assert [x["backend"] for x in data["results"]] == ["onnxruntime"]
    assert data["results"][0]["providers"] == ["cpu"]


def test_fila_bench_names_a_provider_this_onnxruntime_lacks(tiny_artifacts, tmp_path):
    args = ["bench", "--artifacts", str(tiny_artifacts), "--backends", "onnxruntime"]
    r = run_fila(*args, "--providers", "cuda", "--rounds", "1", "--out", str(tmp_path / "b"))
    assert r.returncode == 1
    assert "CUDAExecutionProvider" in r.stderr and "onnxruntime-gpu" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_trt_and_verify_without_torch(fila_without_torch, tiny_artifacts):
    r = fila_without_torch("check-trt", "--artifacts", str(tiny_artifacts), "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    r = fila_without_torch("verify", str(tiny_artifacts))
    assert r.returncode == 0, r.stderr


def test_validate_against_a_recorded_reference_without_torch(
    fila_without_torch, tiny_recorded, tmp_path
):
    import onnx

    from runtime.manifest import Manifest, sha256_file

    art = copy_export(tiny_recorded, tmp_path / "art")
    files = Manifest.load(art).data["files"]
    assert {"reference.arrays", "reference.info", "reference.image.0"} <= set(files)

    report_path = tmp_path / "report.json"
    args = ["--artifacts", str(art)]
    r = fila_without_torch("validate", "--reference", *args, "--json", str(report_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(report_path.read_text())
    checked = {s["stage"] for s in report["stages"]}
    assert {"vision", "projector", "embed", "decoder", "decoder_gqa"} <= checked
    assert report["tokens_compared"] > 0 and report["first_divergence"] is None

    # an export that went wrong after recording (GELU became a ReLU; manifest re-hashed)
    path = art / "projector.onnx"
    graph = onnx.load(path, load_external_data=False)
    gelu = next(n for n in graph.graph.node if n.op_type == "Gelu")
    gelu.op_type = "Relu"
    del gelu.attribute[:]  # Gelu's ``approximate``
    onnx.save(graph, path)
    manifest = Manifest.load(art)
    manifest.stage("projector")["variants"]["fp32"]["sha256"] = sha256_file(path)
    manifest.save()
    r = fila_without_torch("validate", "--reference", *args)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.endswith("| FAIL |")]
    assert [line.split("|")[1].strip() for line in failed] == ["projector"], r.stdout + r.stderr


def test_fila_plan_without_torch(fila_without_torch, tiny_artifacts):
    args = ["--artifacts", str(tiny_artifacts), "--board", "orin-nano-8gb", "--context", "256"]
    r = fila_without_torch("plan", *args)
    assert r.returncode == 0, r.stderr
    assert "FITS" in r.stdout


def test_validate_reference_without_a_recording_says_how_to_make_one(
    fila_without_torch, tiny_artifacts
):
    r = fila_without_torch("validate", "--reference", "--artifacts", str(tiny_artifacts))
    assert r.returncode == 1
    assert "fila validate --record" in r.stderr and "Traceback" not in r.stderr


def test_fila_serve_without_torch(tmp_path, tiny_artifacts):
    """The server process answers a chat completion with torch unimportable, then stops."""
    import base64

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    with serving(["--artifacts", str(tiny_artifacts), "--model-name", "tiny"], env) as url:
        image = "data:image/jpeg;base64," + base64.b64encode(open(PHOTO, "rb").read()).decode()
        content = [{"type": "image_url", "image_url": {"url": image}}]
        content.append({"type": "text", "text": "What is it?"})
        body = {
            "model": "tiny",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": content}],
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
