"""Stage-by-stage ONNX export into an artifact folder with a manifest.

Each stage is traced with ``torch.onnx.export(dynamo=True)`` from its spec, checked, simplified
with onnxslim (outputs compared before and after against PyTorch), and optionally converted to a
strongly typed fp16 variant. The folder is written under a temporary name and renamed at the end,
so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fila_export import onnx_utils
from fila_export.checkpoint import load_checkpoint
from fila_export.config import preprocess_config
from fila_export.errors_io import OutputError, ensure_new_folder
from fila_export.gqa_decoder import onnx_translation
from fila_export.stages import (
    StageSpec,
    dynamic_shapes,
    export_values,
    sample_inputs,
    stage_specs,
    vision_chain,
)
from runtime.errors import CheckpointError, ExportError
from runtime.manifest import FORMAT, Manifest, file_entry

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

    wrapper = spec.build(model).eval()
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
    onnx_utils.rename_axes(model_proto, axes)
    files = onnx_utils.save(model_proto, path)
    onnx_utils.check(path)
    feeds = dict(zip(names_in, (i.numpy() for i in inputs), strict=True))
    expected = torch_outputs(wrapper, inputs)
    before = onnx_utils.run(path, feeds)
    _compare(spec.name, "export", expected, before, 1e-4)
    if slim:
        slimmed = onnxslim.slim(onnx_utils.load(path))
        onnx_utils.rename_axes(slimmed, axes)
        files = onnx_utils.save(slimmed, path)
        onnx_utils.check(path)
        _compare(spec.name, "onnxslim", before, onnx_utils.run(path, feeds), SLIM_TOLERANCE)
    return files


def export_fp16(src: Path, dst: Path) -> list[Path]:
    return onnx_utils.save(onnx_utils.to_fp16(onnx_utils.load(src)), dst)


def _compare(stage: str, step: str, want: list, got: list, tol: float) -> None:
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise ExportError(
                f"{stage}: after {step}, output {i} has shape {b.shape}, expected {a.shape}"
            )
        err = onnx_utils.rel_l2(a, b)
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
    ensure_new_folder(out, force=False) if not force else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write to {out.parent} ({exc.strerror}); choose a writable --out"
        ) from exc
    try:
        data = _manifest_skeleton(config, checkpoint, tmp)
        bar = tqdm(names, desc="export", unit="stage", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            spec = specs[name]
            t0 = time.perf_counter()
            fp32 = tmp / f"{name}.onnx"
            files = export_stage(model, spec, fp32)
            entry = spec.to_dict() | {"variants": {}, "export_seconds": 0.0}
            entry["variants"]["fp32"] = _variant(tmp, files, "fp32")
            if "fp16" in precisions:
                fp16_files = export_fp16(fp32, tmp / f"{name}.fp16.onnx")
                entry["variants"]["fp16"] = _variant(tmp, fp16_files, "fp16")
            entry["export_seconds"] = round(time.perf_counter() - t0, 2)
            data["stages"][name] = entry
        manifest = Manifest(tmp, data)
        manifest.save()
        if out.exists():
            ensure_new_folder(out, force=True)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)


def _variant(folder: Path, files: list[Path], precision: str) -> dict:
    entry = file_entry(folder, files[0], precision=precision)
    if len(files) > 1:
        entry["external_data"] = file_entry(folder, files[1])
    return entry


def _manifest_skeleton(config, checkpoint: Path, folder: Path) -> dict:
    """Everything but the stages: model config, preprocessing, tokenizer files, newline vector."""
    from safetensors import safe_open

    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = checkpoint / name
        if not src.is_file():
            raise CheckpointError(f"{src} not found: the checkpoint needs its tokenizer files")
        shutil.copy(src, folder / name)
        files[name] = file_entry(folder, folder / name)
    newline = _read_newline(checkpoint, safe_open)
    np.save(folder / "image_newline.npy", newline, allow_pickle=False)
    files["image_newline"] = file_entry(folder, folder / "image_newline.npy")
    tok_cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    return {
        "format": FORMAT,
        "toolkit": TOOLKIT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": OPSET,
        "model": config.to_dict(),
        "preprocess": preprocess_config(config).to_dict(),
        "tokenizer": "tokenizer.json",
        "chat_template": tok_cfg.get("chat_template"),
        "image_token_id": config.image_token_index,
        "eos_token_ids": [config.text.get("eos_token_id", 2)],
        "kv_cache": {
            "layout": "time_major",  # (length, batch, kv_heads, head_dim)
            "present": "new_positions_only",
            "prefill_past_length_zero": True,
        },
        "files": files,
        "vision_chain": vision_chain(config),
        "stages": {},
    }


def _read_newline(checkpoint: Path, safe_open) -> np.ndarray:
    from fila_export.checkpoint import canonical_key, weight_files

    for path in weight_files(checkpoint):
        with safe_open(str(path), "np") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if canonical_key(key) == "image_newline":
                    return f.get_tensor(key).astype(np.float32)
    raise CheckpointError(f"{checkpoint} has no image_newline tensor")
