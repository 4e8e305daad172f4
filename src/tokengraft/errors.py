"""The one error base class. Every error tokengraft raises on bad input or a failed check derives from
``TokengraftError``; ``cli.py`` catches exactly these (and OS errors) and prints one line.

``exit_code``: 2 = bad input (the user must change what they passed), 1 = a check failed (the input
was readable but is wrong: doctor findings, a failed verify).
"""
from __future__ import annotations


class TokengraftError(ValueError):
    """One line that says what is wrong, where, and what to do."""

    exit_code = 2


class CheckFailed(TokengraftError):
    """The input was read but is inconsistent or broken (exit 1)."""

    exit_code = 1
