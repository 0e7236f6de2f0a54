"""One stage to ONNX with memory bounded by that stage's weights.

The stage's module is traced with its parameters on the meta device (``torch.onnx.export``,
dynamo), so tracing holds no weights. Then only the stage's own tensors are read from the
checkpoint, at the export's dtype: PyTorch computes the reference outputs with them, each is
written once into the precision's shared weight file (``weight_file``), and the graph refers to
it by offset; the onnxscript optimizer and the graph edits run on that graph without loading the
weights. The tensors are freed, and only then does ONNX Runtime load the written graph to compare
its outputs with PyTorch's: PyTorch's and ONNX Runtime's copies of a stage are never held at once.
"""

from __future__ import annotations

import contextlib
import gc
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from fila_export.export.gqa_decoder import onnx_translation
from fila_export.export.graph_edits import norms_in_fp32, rename_axes
from fila_export.export.modules import (
    GraphIO,
    dynamic_shapes,
    export_values,
    parity_inputs,
    sample_inputs,
    stage_module,
)
from fila_export.export.weight_file import WeightFile
from fila_export.model.weights import WeightStore, parameter_keys
from runtime import onnx_io
from runtime.compare import compare, tolerance
from runtime.errors import ExportError
from runtime.spec import StageSpec

# 20: GELU is one ``Gelu`` node (opset 20) instead of Div/Erf/Add/Mul/Mul, which keeps ONNX
# Runtime's CPU convolutions in their blocked layout (ConvNeXt 1.36x faster there); TensorRT 10's
# parser reads opsets 9 to 20 and has Gelu.
OPSET = 20


@contextlib.contextmanager
def quiet():
    """torch.onnx prints progress lines and warnings; keep the export's own output readable."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trace(wrapper: GraphIO, spec: StageSpec, inputs: tuple):
    """The stage's ONNX program, traced on meta tensors (no weight memory)."""
    with torch.no_grad(), quiet():
        return torch.onnx.export(
            wrapper,
            tuple(x.to("meta") for x in inputs),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(spec),
            input_names=spec.input_names(),
            output_names=spec.output_names(),
            opset_version=OPSET,
            optimize=False,
            verbose=False,
            custom_translation_table=onnx_translation(),
        )


def tied_keys(model) -> set[str]:
    """Checkpoint keys of parameters the model uses under more than one name."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    keys = parameter_keys(model)
    return {keys[i] for i, n in names.items() if n > 1}


def stage_weights(wrapper: GraphIO, model, store: WeightStore, dtype: torch.dtype) -> dict:
    """name in the traced module -> (checkpoint key, tensor read at ``dtype``)."""
    keys = parameter_keys(model)
    read: dict[str, torch.Tensor] = {}  # a tied parameter is read once for all its names
    out = {}
    for name, p in wrapper.named_parameters(remove_duplicate=False):
        key = keys[id(p)]
        if key not in read:
            read[key] = store.get(key, dtype)
        out[name] = (key, read[key])
    return out


def export_stage(
    model,
    spec: StageSpec,
    store: WeightStore,
    path: Path,
    weights: WeightFile,
    dtype,
    budget: float = float("inf"),
) -> dict:
    """Export one stage at ``dtype`` to ``path`` (its weights into ``weights``), checked against
    PyTorch (within ``budget`` bytes for the parity session); returns how it was checked
    (executor, relative L2, tolerance)."""
    wrapper = GraphIO(stage_module(model, spec.name), spec, dtype)
    inputs = sample_inputs(spec, export_values(spec), dtype=dtype)
    program = trace(wrapper, spec, inputs)
    inputs = parity_inputs(spec, inputs)
    tensors = stage_weights(wrapper, model, store, dtype)
    stage_bytes = sum({key: t.nbytes for key, t in tensors.values()}.values())
    unique = {name: tensors[name][1] for name, _ in wrapper.named_parameters()}  # tied once
    with torch.no_grad():
        expected = torch.func.functional_call(wrapper, unique, inputs)
    del unique
    expected = [
        o.float().numpy() for o in (expected if isinstance(expected, tuple) else (expected,))
    ]
    optimize_structure(program.model, tensors)
    place_weights(program.model.graph, tensors, weights, tied_keys(model))
    del tensors
    write_graph(program, spec, path, weights, fp16=dtype != torch.float32)
    del program
    gc.collect()
    feeds = {n: x.numpy() for n, x in zip(spec.input_names(), inputs, strict=True)}
    executor = parity_executor(dtype, stage_bytes, budget)
    tol = tolerance("fp32" if dtype == torch.float32 else "fp16")
    return check_parity(spec, path, feeds, expected, tol, executor)


def parity_executor(dtype: torch.dtype, stage_bytes: int, budget: float) -> str:
    """ONNX Runtime, unless the stage is fp16 and its CPU provider would not fit ``budget``: it
    holds fp16 weights as fp32 copies, about 3x the fp16 bytes while loading (measured), so a
    large fp16 decoder is checked on ONNX's reference evaluator, which computes in fp16 with one
    copy (numpy: fine for MatMuls, far too slow and large for convolutions at 1536 px, which is
    why it is not the default)."""
    if dtype != torch.float32 and 3 * stage_bytes > budget:
        return "onnx-reference"
    return "onnxruntime"


def place_weights(graph, tensors: dict, weights: WeightFile, tied: set[str]) -> None:
    """Point the graph's weight initializers into the shared weight file. A weight the graph only
    reads transposed (how ``nn.Linear`` exports) is stored transposed, so the graph needs no
    Transpose and no folded copy of it (the optimizer would fold one in memory); a tied weight
    (the embedding an LM head shares) is stored once as it is, and its Transpose stays for the
    runtime to fold."""
    import onnx_ir as ir

    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or source.name not in tensors or not source.is_initializer():
            continue
        key, tensor = tensors[source.name]
        if key in tied:
            continue
        perm = node.attributes.get_ints("perm", None)
        if tensor.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        name = f"{source.name}.T"
        value = ir.Value(
            name=name, shape=ir.Shape(tensor.shape[::-1]), type=ir.TensorType(source.dtype)
        )
        value.const_value = weights.external_tensor(f"{key}.T", tensor.t(), name)
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if name not in tensors:
            continue
        if value.uses() or value.is_graph_output():
            key, tensor = tensors[name]
            value.const_value = weights.external_tensor(key, tensor, name)
        else:  # read only through the transpose folded above
            del graph.initializers[name]


def optimize_structure(model, tensors: dict) -> None:
    """The onnxscript optimizer on the graph with its weights as unknown values: it folds the
    graph's small constants and shape arithmetic but cannot fold (copy) a weight."""
    import logging

    import onnxscript

    for name, value in model.graph.initializers.items():
        if name in tensors:
            value.const_value = None
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it notes every weight it cannot deduplicate
    try:
        with quiet():
            onnxscript.optimizer.optimize(model)
    finally:
        logger.setLevel(level)


def write_graph(program, spec: StageSpec, path: Path, weights: WeightFile, fp16: bool) -> None:
    """Name the axes, keep fp16 norms in fp32, save (the weights are in their file already)."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(program.model)
    rename_axes(proto, {t.name: list(t.shape) for t in [*spec.inputs, *spec.outputs]})
    if fp16:
        norms_in_fp32(proto)
    weights.move_inline(proto, spec.name)
    onnx_io.save(proto, path)
    onnx_io.check(path)


def check_parity(
    spec: StageSpec, path: Path, feeds: dict, expected: list, tol: float, executor: str
) -> dict:
    """The written graph (on ONNX Runtime: weights memory-mapped, no prepacked copies) against
    PyTorch's outputs; returns the record the manifest keeps."""
    if executor == "onnxruntime":
        session = onnx_io.session(path, prepack=False)
        got = session.run(None, feeds)
        del session
    else:
        from fila_export.export.reference_executor import run_reference

        got = run_reference(path, feeds)
    worst = 0.0
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want.shape != have.shape:
            raise ExportError(
                f"{spec.name}: output {i} has shape {have.shape}, expected {want.shape}"
            )
        err = compare(want, np.asarray(have, dtype=np.float32)).rel_l2
        if not err <= tol:
            raise ExportError(
                f"{spec.name}: output {spec.outputs[i].name} differs from PyTorch by {err:.2e} "
                f"relative L2 ({executor}, tolerance {tol:.0e}); report this with the checkpoint "
                "config"
            )
        worst = max(worst, err)
    return {"executor": executor, "rel_l2": float(f"{worst:.3g}"), "tolerance": tol}
