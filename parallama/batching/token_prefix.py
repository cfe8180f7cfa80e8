"""How far two token lists agree from the start."""

from __future__ import annotations


def common_prefix(segment: list[int], tokens: list[int], offset: int, limit: int) -> int:
    """How many of ``segment``'s tokens equal ``tokens[offset:limit]`` from the start (C-speed slices)."""
    n = min(len(segment), limit - offset)
    if n <= 0 or segment[0] != tokens[offset]:
        return 0
    if segment[:n] == tokens[offset:offset + n]:
        return n
    lo, hi = 1, n  # segment[:lo] matches, segment[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if segment[:mid] == tokens[offset:offset + mid]:
            lo = mid
        else:
            hi = mid
    return lo
