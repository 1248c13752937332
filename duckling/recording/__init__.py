"""The W store: what a run records and how it is read back, with numpy and zstd alone.

``layout`` (the format's constants), ``codec`` (one block's bytes), ``streams`` (one stream of blocks),
``writer`` (``RecordingWriter``), ``reader`` (``Recording``), ``compact`` (upgrades older recordings)
and ``budget`` (bytes a run will need). Never imports training, analysis or sweeps."""
