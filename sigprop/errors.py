"""Errors caused by what a user asked for (unknown model, bad spec field, missing data).

The command line prints their message as one line and exits with code 2, no traceback.
"""


class UserError(ValueError):
    """Bad input: the message names the problem and, where there are some, the valid choices."""
