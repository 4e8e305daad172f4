"""The one error base class. Every error tokengraft raises on bad input or a failed check derives from
``TokengraftError``; ``cli.py`` prints it as one line and exits with the class's ``exit_code``.

``exit_code``: 2 = bad input (the user must change what they passed), 1 = a check failed (the input
was readable but is wrong: doctor findings, a failed verify). ``details``: lines printed before the
error line (a failed verify's measurements), empty for most errors.
"""
from __future__ import annotations


class TokengraftError(ValueError):
    """One line that says what is wrong, where, and what to do."""

    exit_code = 2
    details: tuple[str, ...] = ()
