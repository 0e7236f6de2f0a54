"""The reference FILA model (PyTorch): config and presets, the model, checkpoint I/O, the tokenizer
and the reference pipeline. Import the modules themselves (``fila_export.model.fila``): this
package imports nothing, so the config can be read without torch."""
