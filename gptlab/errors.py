"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A user mistake (bad path, bad config, corrupt file). The message is one line saying what
    went wrong, why, and what to do; the CLI prints it and exits with code 2, no traceback."""
