"""Which nodes of a graph ONNX Runtime placed on its CPU provider when a device provider (CUDA,
TensorRT) was asked for: a silent fallback that would otherwise go unseen (the session's log level
hides ONNX Runtime's own notice). Compute nodes that fall back are warned about by name at load.

Recent ONNX Runtime (1.32 here) reports the placement through
``get_provider_graph_assignment_info`` (with the session option
``session.record_ep_graph_assignment_info``). Older builds without it, such as the 1.23 that
Python 3.10 with numpy < 2 resolves to, print it only in their verbose log while a session is
created ("Node(s) placed on [CPUExecutionProvider]. Number of nodes: N" followed by one
"  OpType (name)" line a node, or "All nodes placed on [EP]"): there a probe session is created
with that log captured (other stderr output of that moment with it) and dropped, and the session
itself is created at the usual log level.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

CPU = "CPUExecutionProvider"
RECORD_OPTION = "session.record_ep_graph_assignment_info"
# Ops that carry a graph's arithmetic; ONNX Runtime puts shape computations (Shape, Gather of
# dims, Concat of sizes, ...) on the CPU on purpose, so only these are warned about.
COMPUTE_OPS = {
    "MatMul",
    "Gemm",
    "Conv",
    "MatMulNBits",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "GroupQueryAttention",
    "Attention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "GatherBlockQuantized",
    "QuantizeLinear",
    "DequantizeLinear",
}
PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")
NODE_LINE = re.compile(r"\]\s{2,}(\S+) \((.*)\)\s*$")


class FallbackWarning(UserWarning):
    """Compute nodes of a graph run on the CPU provider although a device provider was asked."""


def has_assignment_api(ort) -> bool:
    return hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")


def assigned_to_cpu(session) -> list[tuple[str, str]]:
    """(op type, node name) of every node the session placed on the CPU provider."""
    return [
        (node.op_type, node.name)
        for subgraph in session.get_provider_graph_assignment_info()
        if subgraph.ep_name == CPU
        for node in subgraph.get_nodes()
    ]


@contextlib.contextmanager
def captured_stderr():
    """What the process writes to file descriptor 2 meanwhile (ONNX Runtime's C++ log)."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        text: list[str] = []
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read().decode(errors="replace"))


def cpu_nodes_from_log(log: str, all_nodes: Callable[[], list[tuple[str, str]]]):
    """(op type, name) of the nodes a verbose session log says went to the CPU provider;
    ``all_nodes`` lists the graph's nodes (the log names none when all went to one provider)."""
    found: list[tuple[str, str]] = []
    current = None
    for line in log.splitlines():
        placed = PLACED.search(line)
        if placed:
            current = placed.group(2)
            if placed.group(1) == "All nodes":
                return all_nodes() if current == CPU else []
            continue
        node = NODE_LINE.search(line)
        if node and current == CPU:
            found.append((node.group(1), node.group(2)))
        elif node is None:
            current = current if "VerifyEachNodeIsAssignedToAnEp" in line else None
    return found


def graph_nodes(path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(n.op_type, n.name) for n in graph.node]


def warn_fallback(where: str, providers: list[str], nodes: list[tuple[str, str]]) -> None:
    """Warn when compute nodes run on the CPU although ``providers`` put a device first."""
    compute = [f"{op} ({name})" for op, name in nodes if op in COMPUTE_OPS]
    if not compute:
        return
    shown = ", ".join(compute[:12]) + (
        f" and {len(compute) - 12} more" if len(compute) > 12 else ""
    )
    asked = providers[0].removesuffix("ExecutionProvider")
    warnings.warn(
        FallbackWarning(
            f"{Path(str(where)).name}: {len(compute)} compute node(s) run on the CPU provider "
            f"although {asked} was asked first ({len(nodes)} nodes on the CPU in all): {shown}. "
            f"{asked} does not implement them for these types (an fp32 decoder_gqa's "
            "GroupQueryAttention on CUDA, say): use the fp16 export, or accept the copies"
        ),
        stacklevel=4,
    )
