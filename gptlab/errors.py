"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A user mistake (bad path, bad config, corrupt file). The message is one line saying what
    went wrong, why, and what to do; the CLI prints it and exits with code 2, no traceback."""


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty), for a
    ``UserError`` that quotes a library's error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
