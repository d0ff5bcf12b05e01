"""Expected errors: bad input or a bad config, with a message that says what to do.

Recipes print them as one line and exit 1, without a traceback (set ``LLAMA_MIMI_DEBUG=1`` to
see it); anything else is a bug and keeps its traceback. ``UserError`` is a ``ValueError`` so
that callers of the Python API catch it as one.
"""


class UserError(ValueError):
    """Bad input or configuration; the message names the file or key and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the config implies) is not there."""
