"""Shared fixtures: small checkpoints built from presets with fixed seeds, saved to disk and
loaded back through the same code users use."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA and TensorRT are not both present."""
    try:
        import tensorrt  # noqa: F401
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means no GPU stack
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs CUDA and TensorRT (run scripts/gpu_check.sh on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_checkpoint(folder: Path, preset_name: str = "tiny", seed: int = 0, **overrides) -> Path:
    from fila_export.model.checkpoint import save_checkpoint
    from fila_export.model.config import preset
    from fila_export.model.fila import FilaForConditionalGeneration

    config = dataclasses.replace(preset(preset_name), **overrides)
    model = FilaForConditionalGeneration(config)
    model.init_weights(seed)
    return save_checkpoint(model, folder)


@pytest.fixture
def torch_one_thread():
    """Training/generation tests on one torch thread: steady timings on the 2-core CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A FILA (ConvNeXt + CVFM) tiny checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_llava_checkpoint(tmp_path_factory) -> Path:
    """A tiny FILA without the ConvNeXt branch: exactly a LLaVA-NeXT checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", convnext=None)


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def real_images() -> dict[str, Image.Image]:
    """Photos and scans no one here made (scikit-image's and matplotlib's bundled samples)."""
    import matplotlib.cbook as cbook
    import skimage.data as data

    out = {
        name: Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket", "page", "text", "camera")
    }
    out["grace_hopper"] = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (fp32 + fp16), once per session."""
    from fila_export.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("art") / "tiny"
    export_artifacts(tiny_checkpoint, out, precisions=["fp32", "fp16"], progress=False)
    return out


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory) -> Path:
    """The shipped demo checkpoint exported (fp32) with room for 4 rows decoded together (the
    server tests, with and without batching)."""
    from fila_export.demo import CHECKPOINT
    from fila_export.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("demo-art") / "demo"
    export_artifacts(CHECKPOINT, out, precisions=["fp32"], max_batch=4, progress=False)
    return out


def run_fila(*args: str, stdin: str | None = None, env: dict | None = None):
    """The `fila` CLI in a subprocess, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "fila_export.cli", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
