"""`fila init` / `fila generate` through the console entry point, and their error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fila_export.model.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def fila(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fila_export.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_init_and_generate(tmp_path):
    out = tmp_path / "ckpt"
    r = fila("init", "--preset", "tiny", "--out", str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    } <= {p.name for p in out.iterdir()}
    r = fila(
        "generate",
        "--checkpoint",
        str(out),
        "--image",
        "fila_export/demo/examples/photos/chelsea.jpg",
        "--prompt",
        "What is this?",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 <= len(result["token_ids"]) <= 8
    assert result["prompt_token_ids"][0] == 1  # BOS


def test_init_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert fila("init", "--out", str(tmp_path / name), "--seed", "7").returncode == 0
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()
    assert (tmp_path / "a/tokenizer.json").read_text() == (
        tmp_path / "b/tokenizer.json"
    ).read_text()


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = fila("init", "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 1
    assert "already exists; pass --force" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    r = fila(
        "generate",
        "--checkpoint",
        str(tmp_path / "none"),
        "--image",
        "fila_export/demo/examples/photos/chelsea.jpg",
        "--prompt",
        "hi",
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: checkpoint folder")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_tokenizer_special_ids_and_determinism():
    a, b = build_tokenizer(512), build_tokenizer(512)
    assert a.to_str() == b.to_str()
    ids = a.encode("USER: <image>\nWhat is the number?").ids
    assert ids[0] == 1 and 3 in ids
    assert a.decode(a.encode("4821 hello").ids) == "4821 hello"
