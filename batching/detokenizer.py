"""Incremental detokenization with stop sequences.

Each sequence owns a ``tokenizers`` ``DecodeStream``: a new token costs one small decode step
(no full re-decode, no lock shared with the threads that tokenize prompts), and yields text only
once it forms complete characters (a token that ends inside a multi-byte character waits for the
next one). When stop sequences are set, the last ``len(longest stop) - 1`` characters are held
back so a stop sequence split across tokens is never streamed. Concatenating every emitted piece
gives exactly the final text."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from batching.stops import StopMatcher


class IncrementalDetokenizer:
    """Decodes one sequence's generated tokens (prompt excluded), piece by piece.

    ``tokenizer`` is a fast (``tokenizers``-backed) Hugging Face tokenizer. Built on the thread
    that submits the request (compiling the stop sequences); used by the engine thread only.
    """

    def __init__(self, tokenizer, stop_sequences: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stops = StopMatcher(tuple(stop for stop in stop_sequences if stop))
        self.holdback = max(0, self._stops.max_length - 1)
        self.token_ids: list[int] = []
        self.text = ""
        self.num_emitted = 0  # characters of self.text already handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (newly visible text, whether a stop sequence was reached)."""
        self.token_ids.append(token_id)
        piece = self._stream.step(self._backend, token_id) or ""
        stop_at = self._stops.feed(piece)
        self.text += piece
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._emit_until(len(self.text)), True
        return self._emit_until(len(self.text) - self.holdback), False

    def flush(self) -> str:
        """The rest of the text when the sequence finishes for a reason other than a stop
        sequence. Uses one full decode, so the whole output equals ``tokenizer.decode``."""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.startswith(self.text[: self.num_emitted]):
            self.text = full
        return self._emit_until(len(self.text))

    def _emit_until(self, end: int) -> str:
        piece = self.text[self.num_emitted:max(end, self.num_emitted)]
        self.num_emitted += len(piece)
        return piece
