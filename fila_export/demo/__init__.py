"""A small trained FILA that really reads: a synthetic fine-grained reading task, a CPU-sized
config, the training loop behind ``scripts/train_demo_model.py``, the shipped checkpoint and the
bundled examples (reading questions, and photos no one here made for validation and benchmarks).

``data`` is torch-free (numpy + Pillow); ``model`` and ``train`` need torch.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "checkpoint"
EXAMPLES = HERE / "examples"  # questions.jsonl + images/
PHOTOS = EXAMPLES / "photos"  # default images of fila validate and fila bench
