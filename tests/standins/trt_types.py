"""The TensorRT stand-in's types: enums with TensorRT's values, ``Dims``, the logger, host memory,
and the errors it raises (``trt_standin`` says what the stand-in is and is not)."""

from __future__ import annotations

import enum
import hashlib
import sys
from pathlib import Path

import numpy as np

PLAN_MAGIC = b"FILA-TRT-STANDIN-PLAN\n"
ALIGNMENT = 256  # IExecutionContext::setTensorAddress: at least 256-byte alignment


# Misuse found where no exception can be raised (an object's destructor): tests assert it is empty
VIOLATIONS: list[str] = []


class StandInViolation(RuntimeError):
    """A use of the API that TensorRT documents as wrong (real TensorRT: garbage or a crash)."""


# --- enums (TensorRT's values) -----------------------------------------------------------------
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9

    @property
    def itemsize(self) -> int:
        return {0: 4, 1: 2, 2: 1, 3: 4, 4: 1, 5: 1, 6: 1, 7: 2, 8: 8}[int(self)]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 6
    BF16 = 17


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64}
ONNX_TYPES |= {9: DataType.BOOL, 3: DataType.INT8, 2: DataType.UINT8, 16: DataType.BF16}
NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32}
NUMPY |= {DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.INT8: np.int8}
NUMPY |= {DataType.UINT8: np.uint8}


class Dims:
    """A shape; -1 marks a dimension fixed only at run time (iterable through ``__getitem__``)."""

    def __init__(self, shape=()) -> None:
        self._dims = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, arg0: int) -> int:
        return self._dims[arg0]

    def __eq__(self, arg0) -> bool:
        return self._dims == tuple(arg0)

    def __repr__(self) -> str:
        return f"({', '.join(map(str, self._dims))})"


# --- logging -----------------------------------------------------------------------------------
class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self) -> None:
        self.min_severity = ILogger.Severity.WARNING

    def log(self, severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    Severity = ILogger.Severity

    def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
        self.min_severity = ILogger.Severity(int(min_severity))

    def log(self, severity, msg: str) -> None:
        if int(severity) <= int(self.min_severity):
            mark = "FEWIV"[int(severity)]
            print(f"[TensorRT stand-in] [{mark}] {msg}", file=sys.stderr)


class IHostMemory(bytes):
    """Serialized bytes (TensorRT's supports the buffer protocol; this one is ``bytes``)."""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
