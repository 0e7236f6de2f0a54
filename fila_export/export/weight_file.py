"""One external-data file per precision that holds each weight of an export once.

Several graphs read the same weights: ``decoder`` and ``decoder_gqa`` the whole LLM, ``embed``
the table the tied LM head also reads, the fused ``vision`` graph every modular vision stage's.
Each graph's initializers point into ``weights.<precision>.data`` by offset, keyed by the
checkpoint tensor they come from, so an export is about the size of its unique weights. Offsets
are page-aligned so ONNX Runtime can memory-map them instead of copying.
"""

from __future__ import annotations

from pathlib import Path

import torch

ALIGN = 4096
INLINE_LIMIT = 1 << 16  # larger constants the exporter folds also go to the file


def weight_file_name(precision: str) -> str:
    return f"weights.{precision}.data"


class WeightFile:
    def __init__(self, folder: Path, precision: str) -> None:
        self.path = Path(folder) / weight_file_name(precision)
        self.index: dict[str, tuple[int, int]] = {}  # key -> (offset, length)

    def _append(self, raw: memoryview | bytes) -> tuple[int, int]:
        with open(self.path, "ab") as f:
            offset = f.tell()
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            f.write(raw)
        return offset + pad, len(raw)

    def add(self, key: str, tensor: torch.Tensor) -> tuple[int, int]:
        """(offset, length) of a tensor's bytes, written the first time its key is seen."""
        if key not in self.index:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.index[key] = self._append(memoryview(data))
        return self.index[key]

    def external_tensor(self, key: str, tensor: torch.Tensor, name: str):
        """An ``onnx_ir`` tensor that reads ``tensor`` from this file."""
        import onnx_ir as ir

        types = {
            torch.float32: ir.DataType.FLOAT,
            torch.float16: ir.DataType.FLOAT16,
            torch.bfloat16: ir.DataType.BFLOAT16,
        }
        offset, length = self.add(key, tensor)
        return ir.ExternalTensor(
            self.path.name,
            offset,
            length,
            types[tensor.dtype],
            shape=ir.Shape(tuple(tensor.shape)),
            name=name,
            base_dir=str(self.path.parent),
        )

    def move_inline(self, proto, scope: str) -> None:
        """Large constants left inside a graph proto (folded by the optimizer) move to the file
        under graph-scoped keys, so graph files stay small."""
        from onnx import TensorProto

        for init in proto.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL or len(init.raw_data) <= INLINE_LIMIT:
                continue
            offset, length = self._append(init.raw_data)
            self.index[f"{scope}/{init.name}"] = (offset, length)
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", self.path.name), ("offset", offset), ("length", length)):
                entry = init.external_data.add()
                entry.key, entry.value = k, str(v)
