"""Export's error: a bad input or a failed check, in one line that says what, where and what to do."""
from __future__ import annotations

from ..errors import TokengraftError


class ExportError(TokengraftError):
    """A bad input or a failed check: the message says what, where and what to do."""
