"""User-facing errors.

Every failure a user can cause (bad recipe name, bad bits, bad data, missing files) is raised
as :class:`ReparqError` with a one-line message that says what to do. The CLI prints the
message alone and exits with code 2; library callers can catch it like a ``ValueError``.
"""

from __future__ import annotations


class ReparqError(ValueError):
    """A problem with the user's input, with a message that names the fix."""
