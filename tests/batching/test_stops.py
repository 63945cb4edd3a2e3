"""Stop-sequence matching: where generation stops, and that the work per generated character
does not grow with the number or length of a request's stop sequences."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from batching.stops import StopMatcher
from djl_like.requests import MAX_STOP_SEQUENCE_CHARS, MAX_STOP_SEQUENCES


def first_stop(stops: tuple[str, ...], text: str) -> int | None:
    """By definition: at the first character completing any stop, the earliest start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return min(starts)
    return None


def feed_in_pieces(matcher: StopMatcher, text: str, sizes: list[int]) -> int | None:
    position = 0
    for size in sizes:
        found = matcher.feed(text[position:position + size])
        position += size
        if found is not None or position >= len(text):
            return found
    return matcher.feed(text[position:])


@settings(max_examples=500, deadline=None)
@given(stops=st.lists(st.text("abé", min_size=1, max_size=5), min_size=1, max_size=5),
       text=st.text("abcé", max_size=20), sizes=st.lists(st.integers(1, 4), max_size=20))
def test_matches_the_definition_however_the_text_is_split(stops, text, sizes):
    stops = tuple(dict.fromkeys(stops))
    assert feed_in_pieces(StopMatcher(stops), text, sizes) == first_stop(stops, text)


def test_a_stop_completed_first_wins_over_one_starting_earlier():
    assert StopMatcher(("four", ", three")).feed("one, two, three, four") == len("one, two")
    # Both end at the same character: the longer one starts earlier and is cut off whole.
    assert StopMatcher(("cd", "bcd")).feed("abcde") == 1


def test_no_stop_sequences_never_stop():
    matcher = StopMatcher(())
    assert matcher.max_length == 0 and matcher.feed("anything at all") is None


class CountingMatcher(StopMatcher):
    """Counts trie lookups: the matcher's unit of work."""

    lookups = 0

    def _child(self, state, character):
        self.lookups += 1
        return super()._child(state, character)


def test_work_per_character_is_the_same_for_the_largest_allowed_stops_as_for_one():
    rng = random.Random(0)
    # Stops over the text's own two letters keep matching partially: for a naive search, every
    # stop is compared at every character.
    largest = tuple("".join(rng.choice("ab") for _ in range(MAX_STOP_SEQUENCE_CHARS))
                    for _ in range(MAX_STOP_SEQUENCES))
    text = "".join(rng.choice("ab") for _ in range(20_000))
    many, one = CountingMatcher(largest), CountingMatcher(("zz",))
    many.lookups = one.lookups = 0
    assert many.feed(text) is None and one.feed(text) is None
    # Amortised: at most two lookups per character whatever the stops (a naive search does
    # MAX_STOP_SEQUENCES * MAX_STOP_SEQUENCE_CHARS = 4096 comparisons per character here).
    assert many.lookups <= 2 * len(text) and one.lookups <= 2 * len(text)
