"""Incremental detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    """Turns token pieces (raw bytes) into text deltas.

    Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens. The incremental UTF-8
    decoder holds an incomplete trailing sequence back until the bytes that finish it arrive, so a
    delta is always whole characters; ``flush`` releases what is left when the sequence ends.
    """

    __slots__ = ("_piece", "_decoder")

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._piece = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def flush(self) -> str:
        """What is left when the sequence ends. A character cut in half by max_tokens is dropped,
        not turned into U+FFFD."""
        self._decoder.errors = "ignore"
        return self._decoder.decode(b"", final=True)
