"""Errors caused by what a user asked for (unknown model, bad spec field, missing data).

The command line prints their message as one line and exits with code 2, no traceback.
"""


class UserError(ValueError):
    """Bad input: the message names the problem and, where there are some, the valid choices."""


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, else ""."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
