"""One error type for everything a user can get wrong.

Every message names the file, tensor or key, what was expected, and what to do. The CLI
prints it without a traceback and exits non-zero.
"""


class GGQuantError(Exception):
    """A problem with the user's input or request (not a bug in ggquant)."""


class FormatError(GGQuantError):
    """A file is truncated, corrupted or not in the format it claims to be."""
