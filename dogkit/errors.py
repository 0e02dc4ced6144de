"""The exception types the CLI turns into a clean message instead of a traceback."""


class DogkitError(Exception):
    """A problem the user can act on: the message says what failed and what to do next."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, SLURM, systemd): ended as Ctrl-C is, work kept, exit 143."""
