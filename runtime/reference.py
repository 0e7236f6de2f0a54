"""``fila validate --reference``: an export checked against the PyTorch answers recorded next to
it (``fila validate --record``), with the same tolerances and report as a live validation and
without torch — so engines are validated on the board that runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.compare import token_agreement
from runtime.errors import FilaError
from runtime.manifest import Manifest
from runtime.parity import StageChecker, ValidationReport

REFERENCE_DIR = "reference"
ARRAYS = "stages.npz"
INFO = "reference.json"


def array_key(image: int, stage: str, side: str, name: str) -> str:
    return f"{image}/{stage}/{side}/{name}"


def image_label(i: int) -> str:
    return f"reference.image.{i}"


def recorded_stages(arrays) -> dict[tuple[int, str], dict[str, dict]]:
    """(image, stage) -> {"in": feeds, "out": outputs}, in recorded order (arrays read lazily)."""
    out: dict[tuple[int, str], dict[str, dict]] = {}
    for key in arrays.files:
        image, stage, side, name = key.split("/", 3)
        entry = out.setdefault((int(image), stage), {"in": {}, "out": {}})
        entry[side][name] = key
    return out


def check_reference(
    artifacts: str | Path, backend: str = "onnxruntime", precision: str | None = None, **options
) -> ValidationReport:
    """Every exported stage on its recorded inputs against PyTorch's recorded outputs, then
    greedy tokens on the recorded images."""
    from runtime.pipeline import FilaPipeline

    manifest = Manifest.load(artifacts)
    if "reference.info" not in manifest.data.get("files", {}):
        raise FilaError(
            f"{manifest.folder} has no recorded reference; record one where torch is installed: "
            f"fila validate --record --artifacts {manifest.folder} --checkpoint CKPT"
        )
    info = json.loads(manifest.file_path("reference.info").read_text())
    checker = StageChecker(manifest, backend, precision, **options)
    report = ValidationReport(backend, checker.spec.text, images=info["images"])
    with checker, np.load(manifest.file_path("reference.arrays"), allow_pickle=False) as arrays:
        recorded = recorded_stages(arrays)
        last = {stage: image for image, stage in recorded}
        for (image, stage), keys in recorded.items():
            feeds = {n: arrays[k] for n, k in keys["in"].items()}
            want = {n: arrays[k] for n, k in keys["out"].items()}
            checker.check(stage, feeds, want, last=image == last[stage])
    report.stages = checker.stage_results()
    images = [manifest.file_path(image_label(i)) for i in range(len(info["images"]))]
    with FilaPipeline.from_artifacts(
        artifacts, backend=backend, precision=precision, **options
    ) as pipe:
        got = [
            pipe.generate(p, info["prompt"], max_new_tokens=info["max_new_tokens"]).token_ids
            for p in images
        ]
    agreement = token_agreement(info["tokens"], got)
    report.tokens_compared, report.tokens_equal = agreement.compared, agreement.equal
    report.first_divergence = agreement.first_divergence
    return report
