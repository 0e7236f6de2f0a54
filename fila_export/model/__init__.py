"""The reference FILA model (PyTorch)."""

from fila_export.model.fila import FilaForConditionalGeneration, ImageFeatures

__all__ = ["FilaForConditionalGeneration", "ImageFeatures"]
