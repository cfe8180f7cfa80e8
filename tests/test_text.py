"""Text helpers of the sequences layer: the UTF-8-safe incremental detokenizer and stop strings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from parallama.batching.detokenizer import IncrementalDetokenizer
from parallama.batching.stops import StopMatcher

TEXT = "héllo 👋 世界"


def detokenize(pieces: list[bytes]) -> tuple[list[str], str]:
    """Feed byte pieces as tokens 0..n-1; return the deltas and the final flush."""
    detok = IncrementalDetokenizer(lambda token: pieces[token])
    return [detok.add(i) for i in range(len(pieces))], detok.flush()


# --- IncrementalDetokenizer ---------------------------------------------------------------------------
def test_one_byte_pieces_never_split_a_character():
    data = TEXT.encode("utf-8")
    assert len(data) > len(TEXT)  # there are multi-byte characters to split
    deltas, tail = detokenize([bytes([b]) for b in data])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT
    assert tail == ""
    # a character is released by the piece that completes it: 👋 (4 bytes) appears at its last byte
    wave_end = data.index("👋".encode()) + 3
    assert deltas[wave_end] == "👋"
    assert deltas[wave_end - 1] == deltas[wave_end - 2] == deltas[wave_end - 3] == ""


@given(st.text(max_size=40), st.data())
@settings(max_examples=200, deadline=None)
def test_any_split_of_valid_utf8_round_trips(text, data):
    raw = text.encode("utf-8")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=len(raw) + 1)))
    bounds = [0, *cuts, len(raw)]
    pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    deltas, tail = detokenize(pieces)
    assert "".join(deltas) + tail == text
    assert tail == ""
    for delta in deltas:
        delta.encode("utf-8")  # whole characters only: no lone surrogates


def test_empty_pieces_emit_nothing():
    deltas, tail = detokenize([b"", "世".encode(), b"", b"!"])
    assert deltas == ["", "世", "", "!"]
    assert tail == ""


def test_flush_drops_a_character_cut_in_half():
    wave = "👋".encode()
    deltas, tail = detokenize([b"hi ", wave[:2]])
    assert deltas == ["hi ", ""]
    assert tail == ""  # max_tokens cut the emoji: no U+FFFD at the end of the answer


def test_invalid_bytes_become_replacement_characters_without_raising():
    deltas, tail = detokenize([b"a", b"\xff", b"b"])
    assert "".join(deltas) + tail == "a\ufffdb"


# --- StopMatcher ----------------------------------------------------------------------------------------
def feed_all(matcher: StopMatcher, chunks: list[str]) -> tuple[list[str], bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_no_stops_passes_text_through():
    matcher = StopMatcher(())
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored():
    matcher = StopMatcher(("",))
    assert matcher.feed("Hello") == ("Hello", False)


def test_stop_across_chunk_boundaries():
    matcher = StopMatcher(("world",))
    out, stopped = feed_all(matcher, ["Hello wo", "r", "ld and more"])
    assert stopped
    assert out == ["Hello ", "", ""]


def test_stop_inside_one_chunk_cuts_it():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc STOP def") == ("abc ", True)


def test_held_prefix_is_released_when_it_is_not_a_stop():
    matcher = StopMatcher(("world",))
    assert matcher.feed("say wor") == ("say ", False)
    assert matcher.feed("m") == ("worm", False)
    assert matcher.flush() == ""


def test_overlapping_partial_matches():
    matcher = StopMatcher(("abc",))
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("a", False)  # the first "a" can no longer start "abc"
    assert matcher.feed("bc") == ("", True)


def test_earliest_stop_wins_whatever_the_order_given():
    matcher = StopMatcher(("END", "STOP"))
    assert matcher.feed("one STOP two END") == ("one ", True)
    matcher = StopMatcher(("xyz", "ab"))
    out, stopped = feed_all(matcher, ["..a", "b..x", "yz"])
    assert stopped and "".join(out) == ".."


def test_longer_stop_held_while_shorter_one_matches_later():
    matcher = StopMatcher(("abcd", "bc"))
    assert matcher.feed("ab") == ("", False)
    assert matcher.feed("cx") == ("a", True)


def test_flush_releases_a_held_prefix_once():
    matcher = StopMatcher(("Help!",))
    assert matcher.feed("Hel") == ("", False)
    assert matcher.flush() == "Hel"
    assert matcher.flush() == ""


@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_streamed_output_equals_text_cut_at_first_stop(text, stops, data):
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)))))
    bounds = [0, *cuts, len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    matcher = StopMatcher(tuple(stops))
    out, stopped = feed_all(matcher, chunks)
    emitted = "".join(out) + ("" if stopped else matcher.flush())
    # Generation stops at the first chunk after which some stop string has appeared, and the text is
    # cut where the earliest of them starts. (Stops can overlap: with "b" and "aba", "ab" already
    # stops at "b", before "aba" could complete.)
    seen = ""
    for chunk in chunks:
        seen += chunk
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            assert stopped
            assert emitted == seen[: min(hits)]
            return
    assert not stopped
    assert emitted == text
