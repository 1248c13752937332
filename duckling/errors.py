"""One exception type for bad input: its message is a paragraph that says what to do."""


class DucklingError(Exception):
    """Bad input or state the user can fix. The CLI prints the message without a traceback."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM stopped a run cleanly: a checkpoint was saved at the last completed step.
    The message says how to resume. A KeyboardInterrupt, so notebooks and scripts stop as usual."""
