"""Task accuracy: exact-match answers of PyTorch fp32 and of the export at each precision on a
question set (``fila validate --questions``); scoring is ``runtime.answers``'s, shared with
``fila calibrate --questions``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fila_export.model.reference import ReferencePipeline
from runtime.answers import exact_match, pipeline_answers, read_questions
from runtime.pipeline import FilaPipeline


def answer_accuracy(
    questions: str | Path,
    checkpoint: str | Path,
    artifacts: str | Path | None = None,
    precisions: Sequence[str] = ("fp32",),
    backend: str = "onnxruntime",
    max_new_tokens: int = 16,
    limit: int | None = None,
    **runner_options,
) -> dict:
    """Greedy answers of PyTorch fp32 and of the export at each precision, scored by exact match;
    each export row also counts answers identical to PyTorch's (fp32 must match all).
    ``runner_options`` go to ``FilaPipeline.from_artifacts`` (e.g. ``threads``)."""
    records = read_questions(questions)[:limit]
    ref = ReferencePipeline.from_checkpoint(checkpoint)
    torch_answers = [
        ref.generate([r["image"]], r["question"], max_new_tokens=max_new_tokens).text.strip()
        for r in records
    ]
    rows = [
        {
            "backend": "torch",
            "precision": "fp32",
            **exact_match(records, torch_answers),
            "same_as_torch": len(records),
        }
    ]
    answers = {"torch/fp32": torch_answers}
    for spec in (precisions or [None]) if artifacts else ():
        pipe = FilaPipeline.from_artifacts(
            artifacts, backend=backend, precision=spec, **runner_options
        )
        precision = spec or pipe.manifest.base
        got = pipeline_answers(pipe, records, max_new_tokens)
        pipe.close()
        same = sum(a == b for a, b in zip(got, torch_answers, strict=True))
        rows.append(
            {
                "backend": backend,
                "precision": precision,
                **exact_match(records, got),
                "same_as_torch": same,
            }
        )
        answers[f"{backend}/{precision}"] = got
    passed = all(r["same_as_torch"] == r["n"] for r in rows if r["precision"] == "fp32")
    return {
        "questions": str(questions),
        "rows": rows,
        "passed": passed,
        "records": records,
        "answers": answers,
    }


def accuracy_markdown(report: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    lines = [
        f"# Answer accuracy (exact match) on {report['questions']}",
        "",
        "| backend | precision | exact match | boundary subset | same answer as PyTorch |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['backend']} | {r['precision']} | {pct(r['accuracy'])} "
            f"({r['correct']}/{r['n']}) | {pct(r['boundary_accuracy'])} "
            f"({r['n_boundary']}) | {r['same_as_torch']}/{r['n']} |"
        )
    verdict = "PASS" if report["passed"] else "FAIL (fp32 answers differ from PyTorch)"
    lines += ["", f"**{verdict}**"]
    return "\n".join(lines)
