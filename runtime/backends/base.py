"""The runner interface every backend implements (after Polygraphy's runners)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple  # ints and axis names


class Runner(Protocol):
    """Runs one stage graph. Feeds and results are ``name -> array`` dicts named by the stage spec."""

    name: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    last_inference_time: float  # seconds spent in the last ``infer``

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
