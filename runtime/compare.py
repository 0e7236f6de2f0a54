"""Comparing two outputs: relative L2, cosine, SQNR, greedy-token agreement, and the tolerances.

The comparator is its own module (after Polygraphy): export's parity checks, ``fila validate``
(any backend against PyTorch or a recorded reference) and the calibration report (a quantized
variant against fp32) all measure with these functions and judge with ``TOLERANCES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import FilaError

# Relative L2 allowed per precision against the fp32 reference; fp16 graphs keep norms, softmax and
# adds in fp32; int8 is the calibrated vision Q/DQ, w8/w4 the weight-only LLM variants.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1, "w8": 5e-2, "w4": 2e-1}


def tolerance(precision: str) -> float:
    if precision not in TOLERANCES:
        raise FilaError(f"no tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]


@dataclass(frozen=True)
class Comparison:
    """``got`` against ``reference``: largest absolute difference, relative L2 and cosine."""

    max_abs: float
    rel_l2: float
    cosine: float


def compare(reference: np.ndarray, got: np.ndarray) -> Comparison:
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise FilaError(f"cannot compare shapes {np.shape(got)} and {np.shape(reference)}")
    diff = a - b
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    rel = float(np.linalg.norm(diff) / na) if na > 0 else float(nb)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    return Comparison(float(np.abs(diff).max()) if diff.size else 0.0, rel, cos)


def rel_l2(reference: np.ndarray, got: np.ndarray) -> float:
    return compare(reference, got).rel_l2


@dataclass
class Metrics:
    """Pooled over images: cosine, SQNR (dB) and relative L2, and the worst image's cosine."""

    cosine: float
    sqnr_db: float
    rel_l2: float
    min_image_cosine: float = 1.0
    images: int = 0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class MetricAccumulator:
    """``Metrics`` of outputs against references, summed over images; of a multi-output stage
    (ConvNeXt's four maps) the worst output is what is reported."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # name -> [ref.ref, got.got, ref.got, diff.diff]
        self.image_cosines: list[float] = []

    def add(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        worst = 1.0
        for name, a in reference.items():
            a64 = np.asarray(a, dtype=np.float64).ravel()
            b64 = np.asarray(got[name], dtype=np.float64).ravel()
            if a64.shape != b64.shape:
                raise FilaError(
                    f"output {name}: shape {np.shape(got[name])}, expected {np.shape(a)}"
                )
            d = a64 - b64
            s = np.array([a64 @ a64, b64 @ b64, a64 @ b64, d @ d])
            self.sums[name] = self.sums.get(name, 0) + s
            worst = min(worst, _cosine(*s[:3]))
        self.image_cosines.append(worst)

    def result(self) -> Metrics:
        if not self.sums:
            raise FilaError("no outputs were compared (no held-out images to measure on)")
        cos, sqnr, rel = 1.0, float("inf"), 0.0
        for aa, bb, ab, dd in self.sums.values():
            cos = min(cos, _cosine(aa, bb, ab))
            sqnr = min(sqnr, float(10 * np.log10(aa / dd)) if dd > 0 else float("inf"))
            rel = max(rel, float(np.sqrt(dd / aa)) if aa > 0 else float(np.sqrt(dd)))
        sqnr = min(sqnr, 999.0)  # JSON has no infinity; identical outputs read as 999 dB
        return Metrics(cos, sqnr, rel, min(self.image_cosines), len(self.image_cosines))


def _cosine(aa: float, bb: float, ab: float) -> float:
    if aa > 0 and bb > 0:
        return float(ab / np.sqrt(aa * bb))
    return float(aa == bb)


@dataclass(frozen=True)
class TokenAgreement:
    """Greedy sequences against reference sequences, position by position."""

    compared: int  # positions compared (the longer of each pair)
    equal: int
    exact_match_rate: float  # share of sequences identical to their reference
    first_divergence: int | None  # earliest position where any pair differs
    mean_first_divergence: float  # per pair: the first differing position, or its length

    @property
    def token_agreement(self) -> float:
        return self.equal / self.compared if self.compared else 1.0


def token_agreement(
    reference: Sequence[Sequence[int]], got: Sequence[Sequence[int]]
) -> TokenAgreement:
    if len(reference) != len(got):
        raise FilaError(f"{len(got)} sequences against {len(reference)} references")
    compared = equal = exact = 0
    firsts: list[int] = []
    for a, b in zip(reference, got, strict=True):
        n = max(len(a), len(b))
        same = [x == y for x, y in zip(a, b, strict=False)]
        compared += n
        equal += sum(same)
        first = next((i for i, s in enumerate(same) if not s), min(len(a), len(b)))
        exact += list(a) == list(b)
        firsts.append(first if list(a) != list(b) else n)
    diverged = [f for f, a, b in zip(firsts, reference, got, strict=True) if list(a) != list(b)]
    return TokenAgreement(
        compared,
        equal,
        exact / len(reference) if len(reference) else 1.0,
        min(diverged) if diverged else None,
        float(np.mean(firsts)) if firsts else 0.0,
    )
