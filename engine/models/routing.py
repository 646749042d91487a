"""Which adapter acts on which part of a batch.

One object is shared by the Base ControlNet and every adapter-aware layer inside it. It is set
for the length of one forward call (``with model.routing.use(...)``) and read by each layer, so
several conditions can run in ONE batched forward: each condition owns a contiguous slice of the
batch, and each layer applies that condition's LoRA, norm affine or zero conv to its slice only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

# A segment: (adapter name or None for the bare base, start, stop) along the batch dimension.
Segment = tuple[str | None, int, int]


class AdapterRouting:
    def __init__(self) -> None:
        self._plan: str | None | tuple[tuple[str | None, int], ...] = None

    @contextmanager
    def use(self, plan: str | None | Sequence[tuple[str | None, int]]) -> Iterator[None]:
        """Route a forward call: one adapter name for the whole batch (None: the bare base), or
        ``[(name, count), ...]`` giving each adapter the next ``count`` samples of the batch."""
        previous = self._plan
        self._plan = plan if plan is None or isinstance(plan, str) else tuple((n, int(c)) for n, c in plan)
        try:
            yield
        finally:
            self._plan = previous

    def segments(self, batch: int) -> list[Segment]:
        plan = self._plan
        if plan is None or isinstance(plan, str):
            return [(plan, 0, batch)]
        total = sum(count for _, count in plan)
        if total != batch:
            raise ValueError(f"adapter routing covers {total} samples but the batch has {batch}")
        out: list[Segment] = []
        start = 0
        for name, count in plan:
            if out and out[-1][0] == name:  # neighbours with the same adapter act as one slice
                out[-1] = (name, out[-1][1], start + count)
            elif count:
                out.append((name, start, start + count))
            start += count
        return out
