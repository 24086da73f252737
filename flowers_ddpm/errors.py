"""The one exception type for mistakes a user can make (bad config, bad data, missing files, no network)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero."""

    exit_code = 2
