"""The one base class of every error a user can cause and fix: run.py prints its message and exits 1, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, adapter, run directory): the message names it and the fix.

    Anything else that escapes a command is a bug and keeps its traceback.
    """
