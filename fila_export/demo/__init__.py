"""A small trained FILA that really reads: a synthetic fine-grained reading task, a CPU-sized
config, and the training loop behind ``scripts/train_demo_model.py``.

``data`` is torch-free (numpy + Pillow); ``model`` and ``train`` need torch.
"""
