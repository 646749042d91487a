"""Errors whose message is one line meant for the user (the CLI prints it without a traceback)."""


class CtrloraError(Exception):
    """Something the user can fix; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(CtrloraError):
    """Bad input: a malformed argument, a missing or unreadable file."""

    exit_code = 2


class SettingError(UsageError):
    """A setting out of its range or not possible here. ``setting`` is the engine's name for it
    (``precision``, ``grad_accum``); the face words it as the flag the user typed."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


class CheckpointError(UsageError):
    """A weights file that cannot be used."""


def first_few(items: list[str], n: int = 3) -> str:
    """The first ``n`` of ``items`` for a one-line message ("a, b, c, ...")."""
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
