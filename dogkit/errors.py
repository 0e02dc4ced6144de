"""The one exception type the CLI turns into a clean message instead of a traceback."""


class DogkitError(Exception):
    """A problem the user can act on: the message says what failed and what to do next."""
