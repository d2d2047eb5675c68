"""Errors every autopar entry point raises: one message a user can act on, and a CLI exit code."""


class AutoparError(Exception):
    """Base class. `exit_code` is what the CLI returns (DESIGN §6: 1 infeasible / check failed, 2 bad input)."""

    exit_code = 2


class BadInput(AutoparError):
    """The user's model, cluster, flags or plan file cannot be used as given."""

    exit_code = 2


class CaptureError(BadInput):
    """The model could not be captured as a graph; the message names the op/module and what to do."""


class Infeasible(AutoparError):
    """No plan satisfies the constraints (usually memory); the message says what would make one fit."""

    exit_code = 1
