"""Stage-by-stage ONNX export into an artifact folder with a manifest.

Each stage is traced with ``torch.onnx.export(dynamo=True)`` from its spec, checked, simplified
with onnxslim (outputs compared before and after against PyTorch), and optionally converted to a
strongly typed fp16 variant. The folder is written under a temporary name and renamed at the end,
so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fila_export.export.gqa_decoder import onnx_translation
from fila_export.export.graph_edits import rename_axes, to_fp16
from fila_export.export.modules import dynamic_shapes, export_values, sample_inputs, stage_module
from fila_export.export.stages import stage_specs, vision_chain
from fila_export.folders import OutputError, ensure_new_folder
from fila_export.model.checkpoint import load_checkpoint
from fila_export.model.config import preprocess_config
from runtime import onnx_io
from runtime.compare import rel_l2, tolerance
from runtime.errors import CheckpointError, ExportError
from runtime.manifest import FORMAT, Manifest, file_entry
from runtime.prompt import PromptBuilder
from runtime.spec import StageSpec

TOOLKIT_VERSION = "0.1.0"
OPSET = 18
SLIM_TOLERANCE = 1e-5  # relative L2 between the graph before and after onnxslim


def torch_outputs(module: torch.nn.Module, inputs: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def export_stage(model, spec: StageSpec, path: Path, slim: bool = True) -> list[Path]:
    """Export one stage to ``path``; returns the files written (graph [+ external data])."""
    import onnxslim

    wrapper = stage_module(model, spec.name)
    inputs = sample_inputs(spec, export_values(spec))
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            wrapper,
            inputs,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(spec),
            input_names=names_in,
            output_names=names_out,
            opset_version=OPSET,
            verbose=False,
            custom_translation_table=onnx_translation(),
        )
    model_proto = program.model_proto
    axes = {t.name: list(t.shape) for t in [*spec.inputs, *spec.outputs]}
    rename_axes(model_proto, axes)
    files = onnx_io.save(model_proto, path)
    onnx_io.check(path)
    feeds = dict(zip(names_in, (i.numpy() for i in inputs), strict=True))
    expected = torch_outputs(wrapper, inputs)
    before = run_graph(path, feeds)
    _compare(spec.name, "export", expected, before, tolerance("fp32"))
    if slim:
        slimmed = onnxslim.slim(onnx_io.load(path))
        rename_axes(slimmed, axes)
        files = onnx_io.save(slimmed, path)
        onnx_io.check(path)
        _compare(spec.name, "onnxslim", before, run_graph(path, feeds), SLIM_TOLERANCE)
    return files


def run_graph(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph's outputs on ONNX Runtime's CPU provider (the parity checks' other side)."""
    session = onnx_io.session(path)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def export_fp16(src: Path, dst: Path) -> list[Path]:
    return onnx_io.save(to_fp16(onnx_io.load(src)), dst)


def _compare(stage: str, step: str, want: list, got: list, tol: float) -> None:
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise ExportError(
                f"{stage}: after {step}, output {i} has shape {b.shape}, expected {a.shape}"
            )
        err = rel_l2(a, b)
        if not err <= tol:
            raise ExportError(
                f"{stage}: after {step}, output {i} differs from the reference by {err:.2e} relative "
                f"L2 (tolerance {tol:.0e}); report this with the checkpoint config"
            )


class _quiet:
    """torch.onnx prints progress lines; keep our own progress bar readable."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def select_stages(all_names: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    if not wanted:
        return list(all_names)
    unknown = [s for s in wanted if s not in all_names]
    if unknown:
        raise ExportError(
            f"unknown stage(s) {', '.join(unknown)}; this model has {', '.join(all_names)}"
        )
    return [s for s in all_names if s in wanted]


def export_artifacts(
    checkpoint: str | Path,
    out: str | Path,
    precisions: Sequence[str] = ("fp32",),
    stages: Sequence[str] | None = None,
    force: bool = False,
    max_context: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Export every (or the chosen) stage of a checkpoint into ``out`` and write its manifest."""
    from tqdm import tqdm

    out = Path(out)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint} does not exist")
    bad = [p for p in precisions if p not in ("fp32", "fp16")]
    if bad:
        raise ExportError(f"unknown precision(s) {bad}; export writes fp32 and fp16")
    model, config = load_checkpoint(checkpoint)
    specs = stage_specs(config, max_context=max_context)
    names = select_stages(list(specs), stages)
    if not force:
        ensure_new_folder(out, force=False)
    tmp = _scratch_folder(out)
    try:
        data = _manifest_skeleton(model, config, checkpoint, tmp)
        bar = tqdm(names, desc="export", unit="stage", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            data["stages"][name] = _export_variants(model, specs[name], tmp, precisions)
        Manifest(tmp, data).save()
        if out.exists():
            ensure_new_folder(out, force=True)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)


def _scratch_folder(out: Path) -> Path:
    """A new folder beside ``out``, renamed to it only when the export succeeds."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write to {out.parent} ({exc.strerror}); choose a writable --out"
        ) from exc


def _export_variants(model, spec: StageSpec, folder: Path, precisions: Sequence[str]) -> dict:
    """One stage's fp32 graph (and fp16 from it): its manifest entry."""
    t0 = time.perf_counter()
    fp32 = folder / f"{spec.name}.onnx"
    entry = spec.to_dict() | {"variants": {}}
    entry["variants"]["fp32"] = _variant(folder, export_stage(model, spec, fp32), "fp32")
    if "fp16" in precisions:
        fp16 = export_fp16(fp32, folder / f"{spec.name}.fp16.onnx")
        entry["variants"]["fp16"] = _variant(folder, fp16, "fp16")
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def _variant(folder: Path, files: list[Path], precision: str) -> dict:
    entry = file_entry(folder, files[0], precision=precision)
    if len(files) > 1:
        entry["external_data"] = file_entry(folder, files[1])
    return entry


def _manifest_skeleton(model, config, checkpoint: Path, folder: Path) -> dict:
    """Everything but the stages: model config, preprocessing, the tokenizer files (the one source
    of the chat template, EOS and image token), the newline vector."""
    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = checkpoint / name
        if not src.is_file():
            raise CheckpointError(f"{src} not found: the checkpoint needs its tokenizer files")
        shutil.copy(src, folder / name)
        files[name] = file_entry(folder, folder / name)
    image_token = PromptBuilder.from_folder(folder).image_token_id
    if image_token != config.image_token_index:
        raise CheckpointError(
            f"{checkpoint}: the tokenizer's image token has id {image_token}, config.json's "
            f"image_token_index is {config.image_token_index}; make them agree"
        )
    newline = model.image_newline.detach().float().numpy()
    np.save(folder / "image_newline.npy", newline, allow_pickle=False)
    files["image_newline"] = file_entry(folder, folder / "image_newline.npy")
    return {
        "format": FORMAT,
        "toolkit": TOOLKIT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": OPSET,
        "model": config.to_dict(),
        "preprocess": preprocess_config(config).to_dict(),
        "tokenizer": "tokenizer.json",
        "files": files,
        "vision_chain": vision_chain(config),
        "stages": {},
    }
