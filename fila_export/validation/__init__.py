"""Validation against the PyTorch reference: per-stage parity and greedy tokens (``parity``), and
exact-match task accuracy on a question set (``accuracy``)."""
