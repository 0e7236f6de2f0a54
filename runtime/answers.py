"""Task accuracy: a question set (JSONL of image, question, answer) and exact-match scoring.

Torch-free, so ``fila validate --questions`` (PyTorch vs the export) and ``fila calibrate
--questions`` (fp32 export vs each quantized variant) score answers the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import FilaError


def read_questions(path: str | Path) -> list[dict]:
    """A JSONL question set (or the folder holding ``questions.jsonl``): one object per line with
    ``image`` (relative to the file's folder, or absolute), ``question``, ``answer`` and an
    optional ``boundary`` flag. Image paths come back absolute."""
    path = Path(path)
    if path.is_dir():
        path = path / "questions.jsonl"
    if not path.is_file():
        raise FilaError(f"question set {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = {"image", "question", "answer"} - set(rec)
        if missing:
            raise FilaError(f"{path}:{n}: missing {', '.join(sorted(missing))}")
        image = Path(rec["image"])
        records.append(
            {
                "image": str(image if image.is_absolute() else path.parent / image),
                "question": rec["question"],
                "answer": str(rec["answer"]),
                "boundary": bool(rec.get("boundary", False)),
            }
        )
    return records


def exact_match(records: list[dict], answers: list[str]) -> dict:
    """Exact-match accuracy (answers stripped) overall and on the ``boundary`` subset."""
    hits = [a.strip() == r["answer"].strip() for r, a in zip(records, answers, strict=True)]
    on = [h for h, r in zip(hits, records, strict=True) if r["boundary"]]
    return {
        "n": len(hits),
        "correct": sum(hits),
        "accuracy": sum(hits) / len(hits) if hits else None,
        "n_boundary": len(on),
        "boundary_accuracy": sum(on) / len(on) if on else None,
    }


def pipeline_answers(pipe, records: list[dict], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers of a ``FilaPipeline`` to every question (stripped)."""
    return [
        pipe.generate(r["image"], r["question"], max_new_tokens=max_new_tokens).text.strip()
        for r in records
    ]
