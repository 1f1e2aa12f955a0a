"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a file, key or value the user gave. The message says what and what to do."""
