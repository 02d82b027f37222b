"""User-facing errors: every bad input becomes one FsdiffError with a message that names the file or
argument, what is wrong, and what to do."""


class FsdiffError(Exception):
    """A user-facing error; the CLI prints its message and exits non-zero, without a traceback."""
