"""Errors a user can cause, and the signal that work was cancelled.

`PhenotwinError` subclasses `ValueError` so callers that only know the standard library
still catch it; its message always says what was wrong and what to do about it.
"""

from __future__ import annotations


class PhenotwinError(ValueError):
    """Bad input, a bad checkpoint or a bad setting; the message names the fix."""


class CheckpointError(PhenotwinError):
    """A checkpoint folder that cannot be read safely."""


class Cancelled(Exception):
    """Raised when the user cancelled a long operation; nothing was written or changed."""


class PhenotwinWarning(UserWarning):
    """Something was done on the user's behalf that they should know about (e.g. a resize)."""
