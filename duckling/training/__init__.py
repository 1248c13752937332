"""One run: the model, the optimizers, the Hugging Face ``Trainer`` and its recorder callback, and the
run folder's life (checks, lock, signals, failure). Imports ``data`` and ``recording``, never above."""
