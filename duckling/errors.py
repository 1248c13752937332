"""One exception type for bad input: its message is a paragraph that says what to do."""


class DucklingError(Exception):
    """Bad input or state the user can fix. The CLI prints the message without a traceback."""
