"""A recording in, numbers and figures out: ``metrics`` (pure functions), ``update_rule``, ``plots`` and
``report``. Reads recordings; never imports training or sweeps."""
