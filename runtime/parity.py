"""The parity report and the stage checker, without torch: a stage of an export is run on
recorded inputs and compared with recorded outputs, whether PyTorch produced them a moment ago
(``fila validate``) or at record time (``fila validate --reference`` on a board)."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends import load_runner
from runtime.compare import TOLERANCES, Comparison, compare, tolerance
from runtime.errors import FilaError
from runtime.manifest import Manifest
from runtime.variants import precision_spec, stage_variant

PROMPT = "Describe the image."


@dataclass
class StageResult:
    stage: str
    precision: str
    max_abs: float
    rel_l2: float
    cosine: float
    tolerance: float
    passed: bool


@dataclass
class ValidationReport:
    backend: str
    precision: str = "fp32"
    stages: list[StageResult] = field(default_factory=list)
    tokens_compared: int = 0
    tokens_equal: int = 0
    first_divergence: int | None = None
    images: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        # Exact greedy agreement is required of fp32; lower precisions report it (their accuracy
        # gate is the per-stage tolerance and the calibration report).
        exact = self.first_divergence is None or self.precision != "fp32"
        return all(s.passed for s in self.stages) and exact

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed, "tolerances_rel_l2": TOLERANCES}

    def markdown(self) -> str:
        lines = [
            f"# Validation ({self.backend}) on {len(self.images)} image(s)",
            "",
            "| stage | precision | max abs | rel L2 | cosine | tolerance (rel L2) | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            lines.append(
                f"| {s.stage} | {s.precision} | {s.max_abs:.2e} | {s.rel_l2:.2e} | "
                f"{s.cosine:.6f} | {s.tolerance:.0e} | {'pass' if s.passed else 'FAIL'} |"
            )
        div = "none" if self.first_divergence is None else str(self.first_divergence)
        lines += [
            "",
            f"Greedy tokens: {self.tokens_equal}/{self.tokens_compared} equal, "
            f"first divergence: {div}",
            "",
            f"**{'PASS' if self.passed else 'FAIL'}**",
        ]
        return "\n".join(lines)


def worst_output(want: dict, got: dict) -> Comparison:
    """The output of a stage furthest from the reference (by relative L2)."""
    results = [compare(np.asarray(want[name]), got[name]) for name in want]
    return max(results, key=lambda c: c.rel_l2)


class StageChecker:
    """Runs each stage of an export on the reference's feeds and keeps its worst comparison."""

    def __init__(self, manifest: Manifest, backend: str, precision: str, **options) -> None:
        self.manifest, self.backend, self.options = manifest, backend, options
        self.spec = precision_spec(manifest, precision)
        self.runners: dict[tuple[str, str], object] = {}
        self.results: dict[tuple[str, str], list[Comparison]] = {}
        self.engines = None
        if backend == "tensorrt":  # only what was built can be checked
            from runtime.backends.tensorrt.loader import built_engines

            self.engines = built_engines(manifest)
            if not self.engines:
                raise FilaError(
                    f"no TensorRT engines are built in {manifest.folder}; run fila build "
                    f"--artifacts {manifest.folder} --precision ... first"
                )

    def variant(self, name: str) -> str | None:
        """The variant to check, or None when the stage is not exported, not this backend's, or
        (TensorRT) not built."""
        if name not in self.manifest.stages or not self.manifest.spec(name).runs_on(self.backend):
            return None
        variant = stage_variant(self.manifest, self.spec, name, self.backend)
        if self.engines is not None and (name, variant) not in self.engines:
            return None
        return variant

    def check(self, name: str, feeds: dict, want: dict, last: bool = False) -> None:
        """Compare one stage; ``last``: no later image needs it, so its session is freed now
        (one stage's session at a time next to the reference model)."""
        variant = self.variant(name)
        if variant is None:
            return
        key = (name, variant)
        if key not in self.runners:
            self.runners[key] = load_runner(
                self.backend, self.manifest, name, variant, **self.options
            )
        got = self.runners[key].infer({k: np.asarray(v) for k, v in feeds.items()})
        self.results.setdefault(key, []).append(worst_output(want, got))
        if last:
            self.runners.pop(key).close()
            gc.collect()

    def stage_results(self) -> list[StageResult]:
        out = []
        for (name, variant), results in self.results.items():
            worst = max(results, key=lambda c: c.rel_l2)
            tol = tolerance(variant)
            out.append(
                StageResult(name, variant, *asdict(worst).values(), tol, worst.rel_l2 <= tol)
            )
        return out

    def close(self) -> None:
        """Free every stage session before a pipeline loads its own (peak memory)."""
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        gc.collect()

    def __enter__(self) -> StageChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(report: ValidationReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2))
