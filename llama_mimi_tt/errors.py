"""Expected errors: bad input or a bad config, with a message that says what to do.

Recipes print them as one line and exit 1, without a traceback (set ``LLAMA_MIMI_DEBUG=1`` to
see it); anything else is a bug and keeps its traceback. ``UserError`` is a ``ValueError`` so
that callers of the Python API catch it as one.
"""

from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """Bad input or configuration; the message names the file or key and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the config implies) is not there."""


@contextmanager
def writing(path):
    """Turns an ``OSError`` raised while writing ``path`` (disk full, permissions, a folder in
    the way) into a UserError that names the path."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise UserError(
            f"cannot write {Path(path)}: {e.strerror or e}. Free space there (or fix its "
            "permissions, or choose another output folder) and run the same command again."
        ) from e
