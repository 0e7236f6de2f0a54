"""Weights at size: a model built without memory for its parameters, the checkpoint's tensors
read lazily by key, and random checkpoints written tensor by tensor into shards.

A 2-8 B model does not fit twice in a 24 GB machine (an 8 GB board not even once in fp32), so
nothing here holds a whole model's weights unless the caller asks for them: ``empty_model`` puts
every parameter on the meta device (buffers stay real: rotary tables, position ids), a
``WeightStore`` reads one tensor at a time from the safetensors shards, and ``write_random``
streams a deterministic random checkpoint to disk shard by shard.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from runtime.errors import CheckpointError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SHARD_BYTES = 2_000_000_000
INDEX_NAME = "model.safetensors.index.json"


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) while buffers
    stay real, as ``torch.export`` needs them to trace."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def parameter_keys(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its key in the model's state dict (a tied parameter: its first key)."""
    return {id(p): name for name, p in model.named_parameters()}


class WeightStore:
    """The tensors of a checkpoint folder, read one at a time by their canonical key."""

    def __init__(self, files: Iterable[Path], canonical) -> None:
        from safetensors import SafetensorError, safe_open

        self.files = list(files)
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self.where[canonical(key)] = (path, key)
                        self.shapes[canonical(key)] = tuple(f.get_slice(key).get_shape())
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        path, name = self.where[key]
        with safe_open(str(path), "pt") as f:
            tensor = f.get_tensor(name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def nbytes(self, keys: Iterable[str], dtype: torch.dtype) -> int:
        """Bytes of these tensors at ``dtype``."""
        return sum(torch.Size(self.shape(k)).numel() * dtype.itemsize for k in keys)


class ShardWriter:
    """Writes tensors into ``model-XXXXX.safetensors`` shards of at most ``max_bytes`` each, then
    the index; holds one shard in memory at most."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.folder, self.max_bytes = Path(folder), max_bytes or MAX_SHARD_BYTES
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + nbytes > self.max_bytes:
            self.flush()
        self.shard[key] = tensor.contiguous()
        self.shard_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.shard:
            return
        name = f"shard-{len(self.written) + 1:05d}.partial"
        save_file(self.shard, str(self.folder / name), metadata={"format": "pt"})
        self.written.append((name, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        """Name the shards (one file: ``model.safetensors``) and write the index."""
        self.flush()
        if len(self.written) == 1:
            (self.folder / self.written[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (partial, keys) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            (self.folder / partial).rename(self.folder / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
