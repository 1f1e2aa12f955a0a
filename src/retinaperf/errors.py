"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a file, key or value the user gave. The message says what and what to do."""


class OutOfMemory(UserError):
    """A run's device could not hold what its configuration asks (batch, image size, precision,
    memory_limit_gib): the user's to change, and told apart from other failures in results.json
    (`failure`), where `retinaperf sweep` finds the boundary of the batch."""
