"""Quiet transformers: the warnings a Duckling user can do nothing about, and its per-file progress bars.
Used by training (train, fused) and analysis (the report's held-out loss by frequency), so it sits below both."""
from __future__ import annotations

import contextlib


# transformers warnings a Duckling user can do nothing about (the inputs are packed, never padded; EOT is
# also pad by design; checkpoint rotation falls back to step numbers, which is what we want).
_UNACTIONABLE = ("attention_mask", "pad_token_id", "mtime may not be reliable", "loss_type")


class _DropUnactionable:
    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in _UNACTIONABLE)


def silence_unactionable_warnings() -> None:
    """Drop the transformers warnings listed in _UNACTIONABLE (idempotent); all others still show."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # makes sure the library's handler exists
    for h in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropUnactionable) for f in h.filters):
            h.addFilter(_DropUnactionable())


@contextlib.contextmanager
def quiet_hf():
    """Silence transformers' per-file progress bars (weights loading, shard writing) for a moment."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
