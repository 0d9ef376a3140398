"""The one exception type hotcold shows to users as a single line (CLI) or an error object (HTTP)."""


class HotcoldError(Exception):
    """A problem with the user's input or environment, explained in one line."""
