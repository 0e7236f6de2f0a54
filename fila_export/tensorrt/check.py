"""Will an export build with TensorRT? A static check of every graph, without TensorRT or a GPU.

The operator tables in ``fila_export/tensorrt/ops/<version>.json`` are data transcribed from onnx-tensorrt's
``docs/operators.md`` (each names its source). Every graph of an export is checked for:

* ``op``: operators the ONNX parser has no importer for (any non-default domain is a plugin);
* ``op-dtype``: an operator fed a data type its row in the table does not list;
* ``const-input``: inputs the parser needs as build-time constants (Reduce ``axes`` ...);
* ``opset``: a default-domain opset outside the parser's range;
* ``dtype``: tensors TensorRT has no type for (float64, string, complex, uint16/32/64, ...), int8 and
  other quantized types outside Q/DQ, and ``Cast`` to a type TensorRT cannot cast to;
* ``dynamic-axis`` / ``profile``: graph input dims that no optimization profile axis of the
  manifest covers;
* ``qdq``: explicit quantization TensorRT rejects: non-zero or non-int8 zero points, non-positive
  scales, per-channel weight scales off the output-channel axis, per-channel activations;
* ``fp32-norm``: normalisation or softmax left in fp16 in a strongly typed graph.
"""

from __future__ import annotations

import json
from pathlib import Path

from fila_export.tensorrt.graph_index import GraphIndex
from fila_export.tensorrt.rules import Checker, Finding
from runtime import onnx_io
from runtime.errors import FilaError

TABLES = Path(__file__).resolve().parent / "ops"
DEFAULT_VERSION = "10.3"


class TrtCheckError(FilaError):
    """No operator table for the requested TensorRT version, or nothing to check."""


class TrtReport(list):
    """The findings (a list of :class:`Finding`) plus which graphs were checked, against what."""

    def __init__(self, findings=(), graphs=None, table=None):
        super().__init__(findings)
        self.graphs: list[tuple[str, str]] = graphs or []
        self.skipped: list[str] = []  # stages meant for another backend (decoder_gqa)
        self.table: dict = table or {}

    def to_dict(self) -> dict:
        return {
            "trt_version": self.table.get("tensorrt"),
            "table_source": self.table.get("source"),
            "graphs": [{"stage": s, "precision": p} for s, p in self.graphs],
            "skipped_stages": self.skipped,
            "findings": [f.to_dict() for f in self],
            "passed": not self,
        }


# --- tables --------------------------------------------------------------------------------------
def _tables() -> dict[str, dict]:
    out = {}
    for path in sorted(TABLES.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def known_versions() -> list[str]:
    return sorted(_tables())


def load_table(version: str = DEFAULT_VERSION) -> dict:
    """The operator table for a TensorRT version: ``10.3``, ``10.3.0.30`` and ``10.x`` all work."""
    tables = _tables()
    wanted = str(version).strip()
    candidates = [wanted, ".".join(wanted.split(".")[:2])]
    for name in candidates:
        for stem, table in tables.items():
            if name in {stem, table.get("tensorrt"), *table.get("aliases", [])}:
                return table
    listing = ", ".join(f"{stem} (TensorRT {t.get('tensorrt')})" for stem, t in tables.items())
    raise TrtCheckError(
        f"no onnx-tensorrt operator table for TensorRT {version!r}; known versions: {listing} "
        f"(add one as {TABLES}/<version>.json)"
    )


# --- entry points --------------------------------------------------------------------------------
def check_model(
    model,
    trt_version: str | dict = DEFAULT_VERSION,
    *,
    stage: str = "graph",
    precision: str = "fp32",
    axes: dict | None = None,
    inputs: list | None = None,
    base_dir: str | Path = "",
    rules: tuple[str, ...] | None = None,
) -> list[Finding]:
    """Every finding for one ONNX model. ``axes`` and ``inputs`` are the stage's manifest entries
    (``{"tiles": {"min", "opt", "max"}}``, ``[{"name", ...}]``); ``rules`` limits the checks to
    some of: opset, op, dtype, dynamic-axis, qdq, fp32-norm."""
    table = trt_version if isinstance(trt_version, dict) else load_table(trt_version)
    g = GraphIndex.build(model, base_dir)
    c = Checker(g, table, stage, precision)
    wanted = set(rules) if rules else {"opset", "op", "dtype", "dynamic-axis", "qdq", "fp32-norm"}
    if g.inference_error:
        c.add("<model>", "onnx", f"ONNX shape inference failed: {g.inference_error}")
    if "opset" in wanted:
        c.opset()
    if "op" in wanted:
        c.operators()
    if "dtype" in wanted:
        c.dtypes()
    if "dynamic-axis" in wanted:
        c.dynamic_axes(axes, inputs)
    if "qdq" in wanted:
        c.qdq()
    if "fp32-norm" in wanted:
        c.fp32_norms()
    return list(c.findings.values())


def check_onnx_file(
    path: str | Path, trt_version: str | dict = DEFAULT_VERSION, **kwargs
) -> list[Finding]:
    """:func:`check_model` on a file (external data is read only for the constants it needs)."""
    path = Path(path)
    model = onnx_io.load(path, external_data=False)
    return check_model(model, trt_version, base_dir=path.parent, **kwargs)


def check_artifacts(
    folder: str | Path, trt_version: str = DEFAULT_VERSION, precisions: list[str] | None = None
) -> TrtReport:
    """Check every stage variant of an export that TensorRT is to build (each file hash-checked
    as it is read)."""
    from runtime.manifest import Manifest

    table = load_table(trt_version)
    manifest = Manifest.load(folder)
    wanted = [p for p in precisions or [] if p]
    report = TrtReport(table=table)
    for stage, entry in manifest.stages.items():
        if not manifest.spec(stage).runs_on("tensorrt"):
            report.skipped.append(stage)
            continue
        for precision in manifest.variants_for(stage, "tensorrt"):
            if wanted and precision not in wanted:
                continue
            report.graphs.append((stage, precision))
            report.extend(
                check_onnx_file(
                    manifest.stage_path(stage, precision),
                    table,
                    stage=stage,
                    precision=precision,
                    axes=entry.get("axes", {}),
                    inputs=entry.get("inputs"),
                )
            )
    if not report.graphs:
        have = sorted({p for e in manifest.stages.values() for p in e["variants"]})
        raise TrtCheckError(
            f"no graph in {folder} has precision {', '.join(wanted)} (it has {', '.join(have)}); "
            "pick from those with --precision"
        )
    return report
