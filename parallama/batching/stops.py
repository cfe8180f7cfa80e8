"""Stop strings matched across token boundaries, never emitted."""

from __future__ import annotations


class StopMatcher:
    """Holds back text that could still become a stop string.

    ``feed`` returns the text that is safe to emit and whether a stop string was found. Text that
    ends with a prefix of some stop string stays pending until the next delta decides it.
    """

    __slots__ = ("_stops", "_pending")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self._stops:
            return delta, False
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        hold = self._longest_stop_prefix_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
