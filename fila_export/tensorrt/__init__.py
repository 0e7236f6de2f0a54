"""TensorRT: engine builds from the manifest (``build``) and a readiness check of every graph
against onnx-tensorrt's operator tables (``check``, ``rules``, ``graph_index``, ``ops/``), which
needs neither TensorRT nor a GPU."""
