"""The one exception type that means "the user gave us something we cannot use".

The CLI turns an :class:`AutopartError` into a one-line message and exit code 2;
anything else is a bug in autopart and is reported as such.
"""

__all__ = ["AutopartError"]


class AutopartError(Exception):
    """Bad input: a missing file, a malformed profile, an impossible request.

    The message is a single line that carries the values that broke it
    (``"4 stages > 3 blocks"``), fit to print as it is.
    """
