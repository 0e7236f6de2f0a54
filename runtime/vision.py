"""The vision side of a request: the fused graph or the modular chain, then LLaVA-NeXT packing.

``walk_chain`` is the one walker of the modular chain (convnext, vit.0, cvfm.0, ..., projector).
It is driven by the stages' declared input and output names: each stage gets the tensors its spec
names from what the image and the stages before it produced, and an output ``X_out`` becomes the
next stage's ``X``. The runtime walks ONNX Runtime or TensorRT runners with it; calibration walks
fp32 sessions; validation and the benchmark walk PyTorch stage modules the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from runtime.errors import ManifestError
from runtime.preprocess import NEWLINE, PreprocessedImage
from runtime.spec import StageSpec

FEATURES = "image_features"
RunStage = Callable[[str, dict], dict]


def image_feeds(image: PreprocessedImage) -> dict[str, np.ndarray]:
    """What the first vision stages take: the tiles and, with a ConvNeXt branch, the global view."""
    feeds = {"pixel_values": image.pixel_values}
    if image.global_view is not None:
        feeds["global_view"] = image.global_view
    return feeds


def walk_chain(
    chain: Sequence[StageSpec], run: RunStage, feeds: dict, record: dict | None = None
) -> dict:
    """Run ``chain`` in order with ``run(stage, feeds) -> outputs``; returns every tensor it
    produced by name (``image_features`` at the end). ``record`` collects each stage's feeds."""
    tensors = dict(feeds)
    for spec in chain:
        missing = [n for n in spec.input_names() if n not in tensors]
        if missing:
            raise ManifestError(
                f"stage {spec.name} takes {', '.join(missing)}, which no earlier stage of the "
                "vision chain produces; re-export the model"
            )
        stage_feeds = {n: tensors[n] for n in spec.input_names()}
        if record is not None:
            record[spec.name] = stage_feeds
        outputs = run(spec.name, stage_feeds)
        for name in spec.output_names():
            tensors[name.removesuffix("_out")] = outputs[name]
    return tensors


class VisionEncoder:
    """Projected tile features of one image, from the fused ``vision`` runner or by walking the
    modular chain's runners (``chain`` is their specs in run order)."""

    def __init__(self, runners: dict, chain: Sequence[StageSpec] = ()) -> None:
        self.runners = runners
        self.chain = list(chain)

    def __call__(self, image: PreprocessedImage, record: dict | None = None) -> np.ndarray:
        if self.chain:
            return walk_chain(self.chain, self.run, image_feeds(image), record)[FEATURES]
        if "vision" not in self.runners:
            raise ManifestError(
                "no vision stage loaded: load the fused 'vision' graph or the chain"
            )
        feeds = image_feeds(image)
        if record is not None:
            record["vision"] = feeds
        return self.runners["vision"].infer(feeds)[FEATURES]

    def run(self, name: str, feeds: dict) -> dict:
        return self.runners[name].infer(feeds)


def pack(features: np.ndarray, image: PreprocessedImage, newline: np.ndarray) -> np.ndarray:
    """LLaVA-NeXT packing (unpad + ``image_newline`` rows) by the image's packing index: one
    (num_tokens, dim) matrix whose rows take the image's token positions in the prompt."""
    rows = np.concatenate([features.reshape(-1, features.shape[-1]), newline[None]])
    return rows[np.where(image.token_index == NEWLINE, rows.shape[0] - 1, image.token_index)]
