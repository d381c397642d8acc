"""The error a user can fix: bad flags, options or files. The CLI prints it as one line.

Anything else that goes wrong is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""
