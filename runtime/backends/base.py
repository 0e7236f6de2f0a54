"""What every runner reports about its graph's inputs and outputs (after Polygraphy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple  # ints and axis names


def np_dtype(name: str) -> np.dtype:
    """A runner's dtype name (``tensor(float16)``, ``float16``) as a numpy dtype."""
    name = str(name).removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))
