"""What every runner reports about its graph's inputs and outputs (after Polygraphy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple  # ints and axis names
