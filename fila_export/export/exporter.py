"""Stage-by-stage ONNX export into an artifact folder with a manifest.

Each stage is traced and checked on its own (``stage_export``), with memory bounded by that stage's
weights; every precision's weights go once into one shared file. ``dtype`` is the precision the
graphs are traced in (fp32, or fp16 straight from fp16 weights); ``--precision fp16`` on an fp32
export adds fp16 graphs traced the same way. The folder is written under a temporary name and
renamed at the end, so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fila_export.export.modules import stage_module
from fila_export.export.stage_export import OPSET, export_stage
from fila_export.export.stages import stage_specs, vision_chain
from fila_export.export.weight_file import WeightFile
from fila_export.folders import OutputError, ensure_new_folder
from fila_export.model.checkpoint import open_model
from fila_export.model.config import preprocess_config
from fila_export.model.weights import parameter_keys, torch_dtype
from runtime.errors import CheckpointError, ExportError
from runtime.manifest import FORMAT, Manifest, file_entry
from runtime.prompt import PromptBuilder
from runtime.spec import StageSpec

TOOLKIT_VERSION = "0.1.0"
PRECISIONS = ("fp32", "fp16")


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
    max_batch: int = 1,
) -> Manifest:
    """Export every (or the chosen) stage of a checkpoint into ``out`` at each precision (the
    first is the export's base) and write its manifest."""
    from tqdm import tqdm

    out, checkpoint = Path(out), Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint} does not exist")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"unknown precision(s) {bad}; export writes {' and '.join(PRECISIONS)}")
    model, config, store = open_model(checkpoint)
    specs = stage_specs(config, max_context=max_context, max_batch=max_batch)
    names = select_stages(list(specs), stages)
    budget = parity_budget(model, names, store, precisions)
    if not force:
        ensure_new_folder(out, force=False)
    tmp = _scratch_folder(out)
    try:
        data = _manifest_skeleton(config, checkpoint, store, tmp, precisions[0])
        for precision in precisions:
            weights = WeightFile(tmp, precision)
            bar = tqdm(names, desc=f"export {precision}", unit="stage", disable=not progress)
            for name in bar:
                bar.set_postfix_str(name)
                entry = data["stages"].setdefault(name, specs[name].to_dict() | {"variants": {}})
                entry["variants"][precision] = _export_variant(
                    model, specs[name], store, tmp, weights, precision, budget
                )
        _record_weight_files(data, tmp)
        Manifest(tmp, data).save()
        if out.exists():
            ensure_new_folder(out, force=True)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)


PROCESS_BYTES = 1e9  # torch, the exporter and the checkpoint index, measured with the tiny model


def parity_budget(model, names, store, precisions) -> float:
    """Bytes a stage's parity session may use: the export's bound (1.5x its largest stage's
    weights, plus 2 GB) less what the process holds anyway."""
    keys = parameter_keys(model)
    largest = 0
    for name in names:
        stage = {keys[id(p)] for p in stage_module(model, name).parameters()}
        for precision in precisions:
            largest = max(largest, store.nbytes(stage, torch_dtype(precision)))
    return 1.5 * largest + 2e9 - PROCESS_BYTES


def _scratch_folder(out: Path) -> Path:
    """A new folder beside ``out``, renamed to it only when the export succeeds."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write to {out.parent} ({exc.strerror}); choose a writable --out"
        ) from exc


def _export_variant(model, spec: StageSpec, store, folder, weights: WeightFile, precision, budget):
    """One stage at one precision: its graph's manifest entry (the weight file is recorded once
    every stage has written into it)."""
    t0 = time.perf_counter()
    dtype = torch_dtype(precision)
    model._apply(lambda t: t.to(dtype) if t.is_meta else t)  # parameters only; buffers stay
    path = folder / (
        f"{spec.name}.onnx" if precision == "fp32" else f"{spec.name}.{precision}.onnx"
    )
    parity = export_stage(model, spec, store, path, weights, dtype, budget)
    gc.collect()
    entry = file_entry(folder, path, precision=precision, parity=parity)
    entry["external_data"] = {"file": weights.path.name}
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def _record_weight_files(data: dict, folder: Path) -> None:
    """Hash each shared weight file once and put its entry into every variant that reads it."""
    entries = {}
    for stage in data["stages"].values():
        for variant in stage["variants"].values():
            name = variant["external_data"]["file"]
            if name not in entries:
                entries[name] = file_entry(folder, folder / name)
            variant["external_data"] = entries[name]


def _manifest_skeleton(config, checkpoint: Path, store, folder: Path, dtype: str) -> dict:
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
    newline = store.get("image_newline").float().numpy()
    np.save(folder / "image_newline.npy", newline, allow_pickle=False)
    files["image_newline"] = file_entry(folder, folder / "image_newline.npy")
    return {
        "format": FORMAT,
        "toolkit": TOOLKIT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": OPSET,
        "dtype": dtype,
        "model": config.to_dict(),
        "preprocess": preprocess_config(config).to_dict(),
        "tokenizer": "tokenizer.json",
        "files": files,
        "vision_chain": vision_chain(config),
        "stages": {},
    }
