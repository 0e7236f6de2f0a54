"""``fila validate --questions``: exact-match answer accuracy of PyTorch vs the export (issue 8)."""

from __future__ import annotations

import json

import pytest

from fila_export.demo import data
from fila_export.validation.accuracy import answer_accuracy
from runtime.answers import exact_match, read_questions
from tests.conftest import run_fila

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def question_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("questions")
    return data.write_question_set(list(data.generate(5, 3, boundary_share=0.5)), folder)


def test_exact_match_scores_overall_and_boundary():
    records = [
        {"answer": "123", "boundary": True},
        {"answer": "CAT", "boundary": False},
        {"answer": "DOG", "boundary": True},
    ]
    got = exact_match(records, [" 123", "CAT", "DOG!"])
    assert got["correct"] == 2 and got["accuracy"] == pytest.approx(2 / 3)
    assert got["n_boundary"] == 2 and got["boundary_accuracy"] == 0.5


def test_question_set_paths_resolve_against_the_file(question_set):
    records = read_questions(question_set.parent)
    assert len(records) == 3
    assert all(r["image"].startswith(str(question_set.parent)) for r in records)


def test_onnx_fp32_answers_equal_pytorch(tiny_checkpoint, tiny_artifacts, question_set):
    report = answer_accuracy(
        question_set, tiny_checkpoint, tiny_artifacts, ["fp32"], max_new_tokens=6
    )
    torch_row, onnx_row = report["rows"]
    assert (torch_row["backend"], onnx_row["backend"]) == ("torch", "onnxruntime")
    assert onnx_row["same_as_torch"] == onnx_row["n"] == 3 and report["passed"]
    assert report["answers"]["torch/fp32"] == report["answers"]["onnxruntime/fp32"]
    # Random weights do not read, so score a set whose answers are PyTorch's own: all correct.
    lines = question_set.read_text().splitlines()
    fixed = question_set.parent / "own.jsonl"
    recs = [json.loads(line) for line in lines]
    for rec, ans in zip(recs, report["answers"]["torch/fp32"], strict=True):
        rec["answer"] = ans
    fixed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = run_fila(
        "validate",
        "--artifacts",
        str(tiny_artifacts),
        "--checkpoint",
        str(tiny_checkpoint),
        "--questions",
        str(fixed),
        "--tokens",
        "6",
        "--json",
        str(fixed.parent / "report.json"),
    )
    assert res.returncode == 0, res.stderr
    assert "exact match" in res.stdout
    rows = json.loads((fixed.parent / "report.json").read_text())["rows"]
    assert [r["accuracy"] for r in rows] == [1.0, 1.0]
