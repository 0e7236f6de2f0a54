"""Shared fixtures: small checkpoints built from presets with fixed seeds, saved to disk and
loaded back through the same code users use.

The exports tests share are made once per session. With ``FILA_ARTIFACTS_DIR`` set (``.ci/run``)
they are made there and kept, so the board-like leg (``make test-board``: Python 3.10, numpy < 2,
no torch) runs its ``board`` tests on the exports the dev leg made and recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
SHARED = os.environ.get("FILA_ARTIFACTS_DIR")
DONE = ".complete"  # written last into a shared export


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def shared_export(tmp_path_factory, name: str, make) -> Path:
    """The export ``make(out)`` writes, once per session; in ``FILA_ARTIFACTS_DIR`` when set
    (made there by the dev leg, read by the board leg, which cannot make it without torch)."""
    if SHARED:
        out = Path(SHARED) / name
        if (out / DONE).is_file():
            return out
        if not has_torch():
            pytest.fail(
                f"{out} is missing: the board leg runs on the exports the dev leg made in "
                "FILA_ARTIFACTS_DIR (bash .ci/run runs both legs in order)"
            )
        shutil.rmtree(out, ignore_errors=True)
    else:
        if os.environ.get("FILA_BOARD_LEG"):  # the board leg must not pass by testing nothing
            pytest.fail("the board leg needs FILA_ARTIFACTS_DIR (the dev leg's exports)")
        if not has_torch():
            pytest.skip("making an export needs torch (or FILA_ARTIFACTS_DIR with the exports)")
        out = tmp_path_factory.mktemp("art") / name
    make(out)
    (out / DONE).write_text("")
    return out


def pytest_ignore_collect(collection_path, config):
    """Without torch (the board-like leg), only the modules that declare ``board`` tests are
    collected: the others import torch, transformers or timm at module level."""
    name = collection_path.name
    if has_torch() or not (name.startswith("test_") and name.endswith(".py")):
        return None
    return "mark.board" not in collection_path.read_text()


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
def tiny_artifacts(request, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (fp32 + fp16), once per session."""

    def make(out: Path) -> None:
        from fila_export.export.exporter import export_artifacts

        ckpt = request.getfixturevalue("tiny_checkpoint")
        export_artifacts(ckpt, out, precisions=["fp32", "fp16"], progress=False)

    return shared_export(tmp_path_factory, "tiny", make)


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory) -> Path:
    """The shipped demo checkpoint exported (fp32) with room for 4 rows decoded together (the
    server tests, with and without batching)."""

    def make(out: Path) -> None:
        from fila_export.demo import CHECKPOINT
        from fila_export.export.exporter import export_artifacts

        export_artifacts(CHECKPOINT, out, precisions=["fp32"], max_batch=4, progress=False)

    return shared_export(tmp_path_factory, "demo", make)


def recorded(tmp_path_factory, name: str, source: Path, checkpoint, **options) -> Path:
    """A copy of the export ``source`` with PyTorch's answers recorded next to it (``fila
    validate --record``), for ``--reference`` checks where torch is not installed."""

    def make(out: Path) -> None:
        from fila_export.validation.record import record_reference

        shutil.copytree(source, out, ignore=shutil.ignore_patterns(DONE, "engines"))
        record_reference(out, checkpoint(), **options)

    return shared_export(tmp_path_factory, name, make)


@pytest.fixture(scope="session")
def tiny_recorded(request, tiny_artifacts, tmp_path_factory) -> Path:
    """``tiny_artifacts`` with a recorded reference (one image, 4 greedy tokens)."""

    def checkpoint():
        return request.getfixturevalue("tiny_checkpoint")

    return recorded(
        tmp_path_factory, "tiny-recorded", tiny_artifacts, checkpoint, tokens=4, max_images=1
    )


@pytest.fixture(scope="session")
def demo_recorded(demo_artifacts, tmp_path_factory) -> Path:
    """``demo_artifacts`` with a recorded reference (two images, 8 greedy tokens)."""

    def checkpoint():
        from fila_export.demo import CHECKPOINT

        return CHECKPOINT

    return recorded(
        tmp_path_factory, "demo-recorded", demo_artifacts, checkpoint, tokens=8, max_images=2
    )


def copy_export(source: Path, out: Path) -> Path:
    """A private copy of a shared export (a test that builds engines into it or edits it)."""
    shutil.copytree(
        source, out, ignore=shutil.ignore_patterns(DONE, "engines", ".fila-verified.json")
    )
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


@contextlib.contextmanager
def serving(args: list[str], env: dict | None = None, timeout: float = 120):
    """``fila serve ARGS`` in a subprocess on a free loopback port; yields its URL once
    ``/health`` answers, and stops it afterwards."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fila_export.cli", "serve", *args, "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "fila serve did not start"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
