"""Errors whose message is one line meant for the user (the CLI prints it without a traceback)."""


class CtrloraError(Exception):
    """Something the user can fix; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(CtrloraError):
    """Bad input: a malformed argument, a missing or unreadable file."""

    exit_code = 2


class CheckpointError(UsageError):
    """A weights file that cannot be used."""
