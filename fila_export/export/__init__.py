"""ONNX export: the stage specs (``stages``), the PyTorch module of each stage (``modules``), the
ONNX Runtime decoder with GroupQueryAttention (``gqa_decoder``), graph edits (axis names, fp16)
and the exporter that writes an artifact folder with its manifest (``exporter``)."""
