"""Text to training rows: the compact vocabulary (``vocab``), the tokenized dataset (``build``) and the
rows a run reads (``rows``). Imports nothing above it but ``duckling.config``, ``duckling.errors`` and
``duckling.files``."""
