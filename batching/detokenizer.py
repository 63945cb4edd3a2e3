"""Incremental detokenization with stop sequences.

Each new token extends the text only once it decodes to complete characters (a token that ends
inside a multi-byte character waits for the next one). When stop sequences are set, the last
``len(longest stop) - 1`` characters are held back so a stop sequence split across tokens is
never streamed. Concatenating every emitted piece gives exactly the final text."""

from __future__ import annotations

import contextlib

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one sequence's generated tokens (prompt excluded), piece by piece."""

    def __init__(self, tokenizer, stop_sequences: tuple[str, ...] = (), lock=None):
        self.tokenizer = tokenizer
        self._lock = lock or contextlib.nullcontext()
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.holdback = max((len(s) for s in self.stop_sequences), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted = 0  # characters of self.text already handed out
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (newly visible text, whether a stop sequence was reached)."""
        self.token_ids.append(token_id)
        searched_from = max(0, len(self.text) - self.holdback)
        self._extend_text()
        stopped = self._truncate_at_stop(searched_from)
        visible = len(self.text) if stopped else len(self.text) - self.holdback
        return self._emit_until(visible), stopped

    def flush(self) -> str:
        """The rest of the text when the sequence finishes for a reason other than a stop
        sequence. Uses one full decode, so the whole output equals ``tokenizer.decode``."""
        full = self._decode(self.token_ids)
        if full.startswith(self.text[: self.num_emitted]):
            self.text = full
        return self._emit_until(len(self.text))

    def _extend_text(self) -> None:
        ids = self.token_ids
        previous = self._decode(ids[self._prefix_offset:self._read_offset])
        current = self._decode(ids[self._prefix_offset:])
        if len(current) > len(previous) and not current.endswith(REPLACEMENT):
            self.text += current[len(previous):]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _truncate_at_stop(self, searched_from: int) -> bool:
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop_sequences) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _emit_until(self, end: int) -> str:
        piece = self.text[self.num_emitted:max(end, self.num_emitted)]
        self.num_emitted += len(piece)
        return piece

    def _decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
