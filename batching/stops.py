"""Stop-sequence matching over streamed text, at a cost independent of the number of stops.

An Aho-Corasick automaton over one request's stop sequences, built once when the request is
submitted (on its HTTP thread). The engine thread then feeds it each generated character once,
doing amortised constant work per character whatever the request's stops, so a request with
many long stops costs the engine no more per token than one with a single stop.
"""

from __future__ import annotations

from array import array

_ROOT = 0


class StopMatcher:
    """Finds where generation must stop: at the first character that completes any stop
    sequence. The text then ends before the earliest-starting stop completed there (the longest
    one ending at that character)."""

    def __init__(self, stop_sequences: tuple[str, ...]):
        self.max_length = max((len(stop) for stop in stop_sequences), default=0)
        # The trie, one entry per state. NOTE: a stop's states are mostly created in a row, so
        # the child of state s is usually s + 1; only the other edges need a dictionary. This
        # keeps the largest allowed set of stops to about a hundred kilobytes (arrays, not lists
        # of int objects, for the same reason).
        self._parent = array("i", [_ROOT])
        self._edge = [""]  # the character on the edge into each state
        self._branches: dict[tuple[int, str], int] = {}  # edges to a child other than s + 1
        self._match_length = array("i", [0])  # the longest stop ending at each state; 0: none
        for stop in stop_sequences:
            self._insert(stop)
        self._fallback = array("i", [_ROOT]) * len(self._parent)
        self._link_fallbacks()
        self._state = _ROOT
        self._num_fed = 0

    def feed(self, text: str) -> int | None:
        """Consume newly generated characters; return the position (counted over everything fed
        so far) where the first completed stop sequence begins, or None."""
        for character in text:
            self._num_fed += 1
            self._state = self._advance(self._state, character)
            length = self._match_length[self._state]
            if length:
                return self._num_fed - length
        return None

    def _advance(self, state: int, character: str) -> int:
        while True:
            child = self._child(state, character)
            if child is not None:
                return child
            if state == _ROOT:
                return _ROOT
            state = self._fallback[state]

    def _child(self, state: int, character: str) -> int | None:
        following = state + 1
        if (following < len(self._parent) and self._parent[following] == state
                and self._edge[following] == character):
            return following
        return self._branches.get((state, character))

    def _insert(self, stop: str) -> None:
        state = _ROOT
        for character in stop:
            child = self._child(state, character)
            if child is None:
                child = len(self._parent)
                self._parent.append(state)
                self._edge.append(character)
                self._match_length.append(0)
                if child != state + 1:
                    self._branches[(state, character)] = child
            state = child
        self._match_length[state] = max(self._match_length[state], len(stop))

    def _link_fallbacks(self) -> None:
        """Link each state to the state of its longest proper suffix that is also a trie path.
        States go shallowest first: a suffix is shorter, so its own link is already set."""
        depth = [0] * len(self._parent)
        for state in range(1, len(self._parent)):  # a parent is always created before its child
            depth[state] = depth[self._parent[state]] + 1
        for state in sorted(range(1, len(self._parent)), key=depth.__getitem__):
            parent = self._parent[state]
            link = _ROOT if parent == _ROOT else self._advance(self._fallback[parent], self._edge[state])
            self._fallback[state] = link
            # A stop ending at the suffix state ends here too: keep the longest.
            self._match_length[state] = max(self._match_length[state], self._match_length[link])
