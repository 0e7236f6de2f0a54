"""The project's exception types: every user-facing failure is one of these.

Each message says what was expected, what was found, and what to do about it; the CLI prints the
message alone (no traceback unless ``--debug``).
"""

from __future__ import annotations


class FilaError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ConfigError(FilaError):
    """A model config is malformed or names something we do not support."""


class CheckpointError(FilaError):
    """A checkpoint folder is missing files, keys, or has tensors of the wrong shape."""


class ImageError(FilaError):
    """An input image cannot be read, is corrupt, or is too large to decode safely."""


class PromptError(FilaError):
    """A prompt is empty or cannot be tokenized into a valid model input."""


class ParameterError(FilaError):
    """A generation or run parameter is outside its valid range."""


class ContextOverflowError(PromptError):
    """Prompt plus image tokens plus requested new tokens do not fit in the model's context."""


class ManifestError(FilaError):
    """An artifact manifest is missing, malformed, or does not match the files beside it."""


class ExportError(FilaError):
    """An ONNX export failed or its output does not match the reference."""


class EngineMismatchError(FilaError):
    """A TensorRT engine was built for another TensorRT version, GPU or source ONNX."""
