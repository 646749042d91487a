"""What the store's library reports while it works, as plain events that the command modules
render (the library never prints): byte counts as ``engine.progress.Progress`` (``task`` names
the file), and ``Message``s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from engine.progress import Progress


@dataclass
class Message:
    """One line for the user. ``level``: "result" says what was done (a command's output, on
    stdout); "note" says how it is going (a resumed download, a cache hit: stderr); "warning"."""

    text: str
    level: str = "result"


Event = Union[Progress, Message]
Listener = Callable[[Event], None]


def tell(listener: Listener | None, text: str, level: str = "result") -> None:
    if listener is not None:
        listener(Message(text, level))
