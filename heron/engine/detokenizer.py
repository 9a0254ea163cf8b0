"""Incremental detokenization of one sequence: generated token ids in, streamable text out.

Owns three things for a single request:
  * turning token ids into text step by step, UTF-8 safe, at a per-step cost bounded by a small
    window of recent tokens (never a re-decode of the whole output);
  * matching stop strings across token boundaries and cutting the text at the earliest match;
  * the hold-back that keeps a partly generated stop string out of a stream.

In: a tokenizer (duck-typed, see `DecodingTokenizer`), the prompt's token ids (only their tail is
used, as decoding context) and, each step, the newly sampled token ids.
Out: `update()` -> the stop string that matched, or None; `output_text`; `get_delta()` -> the text
to send to a client now.

How the window works: we keep a short list of recent ids. `ids[:read_offset]` were already turned
into text and serve only as context; `ids[read_offset:]` are pending. Each step decodes the window
with and without the pending ids and emits the difference; the ids just emitted then become the
context and older ones are dropped. Context matters
because decoding is not a per-token concatenation: SentencePiece-style decoders strip the leading
space of the first token they see, and byte-level BPE tokens may carry only part of a character.
If the window's text ends in U+FFFD, the last character is still incomplete and we wait for more
tokens rather than emit a replacement character.

Incomplete UTF-8 at the end: if generation stops while a character is still incomplete (for
example max_tokens reached in the middle of an emoji), the final flush (`get_delta(finished=True)`)
emits what the tokenizer's own `decode` gives for those bytes, i.e. U+FFFD, just as a one-shot
`decode` of the whole output would. The same holds for a run of invalid bytes that stalls for
_MAX_STALLED_STEPS steps: it is emitted as decoded, U+FFFD and all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from typing import Protocol

# The replacement character: a decode that ends in it means "character not complete yet".
_REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens kept as initial context. One is enough to keep a SentencePiece leading space; a
# few more cost little and cover decoders whose output depends on more than the previous token.
_PROMPT_CONTEXT_TOKENS = 5

# Steps we wait for an incomplete character before emitting the window as decode() gives it.
# A character is at most 4 bytes, so valid text completes within a few tokens (a little longer only
# when several tokens in a row each straddle two characters); a run of invalid bytes may never
# complete, and this cap is what keeps the window, hence the per-step cost, bounded for it.
_MAX_STALLED_STEPS = 16


class DecodingTokenizer(Protocol):
    """What the detokenizer needs from a tokenizer (heron.models.tokenizer.Tokenizer fits)."""

    @property
    def all_special_ids(self) -> Set[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class Detokenizer:
    """Turns one sequence's generated tokens into text, with stop strings and stream hold-back."""

    def __init__(
        self,
        tokenizer: DecodingTokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped_ids: frozenset[int] = (
            frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        )
        # An empty stop string would match everywhere; OpenAI and vLLM ignore it.
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        # Decoding window (see the module docstring): context ids, then pending ids. It is cut
        # down to the last emitted ids on every emit, so it stays short however long the output.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_len: int | None = None  # len(decode(ids[:read_offset])), computed lazily
        self._num_stalled_steps = 0

        # Output text as appended pieces: joining on every step would cost O(output) per step.
        self._pieces: list[str] = []
        self._length = 0
        self._num_streamed = 0

        self.matched_stop: str | None = None
        self._finished = False

    # ----------------------------------------------------------------------------------- API

    @property
    def output_text(self) -> str:
        """All text so far, cut at a matched stop string (kept if include_stop_str_in_output).

        Excludes a trailing character whose bytes are not all generated yet, until it completes or
        the stream is finished with `get_delta(finished=True)`.
        """
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def finished(self) -> bool:
        """True once a stop string matched or the final `get_delta(finished=True)` was taken."""
        return self._finished or self.matched_stop is not None

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Feed newly generated tokens; return the stop string if one now matched, else None.

        Tokens fed after the sequence finished are ignored: the request is over.
        """
        if self.finished:
            return None
        num_before = len(self._ids)
        self._ids.extend(t for t in new_token_ids if t not in self._skipped_ids)
        num_new = len(self._ids) - num_before
        if num_new == 0:
            return None
        return self._append(self._detokenize(num_new))

    def get_delta(self, finished: bool = False) -> str:
        """Text not yet returned by earlier calls.

        While not finished, the last (longest stop string - 1) characters are held back, since they
        may be the start of a stop string that the next tokens complete. `finished=True` flushes
        everything, including a trailing incomplete character (as U+FFFD). Concatenating every
        delta gives exactly `output_text`.
        """
        if finished and not self.finished:
            self._finished = True
            self._append(self._detokenize(0, flush=True))
        end = self._length
        if not self.finished and self._max_stop_len > 1:
            end -= self._max_stop_len - 1
        if end <= self._num_streamed:
            return ""
        delta = self._suffix(self._length - self._num_streamed)[: end - self._num_streamed]
        self._num_streamed = end
        return delta

    # ----------------------------------------------------------------------- detokenization

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        # Walk back from the end so that a long prompt costs nothing beyond its last tokens.
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == _PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skipped_ids:
                context.append(token_id)
        context.reverse()
        return context

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _detokenize(self, num_new: int, flush: bool = False) -> str:
        """New text from the pending ids, or "" while the last character is still incomplete."""
        ids = self._ids
        if len(ids) == self._read_offset:
            return ""
        if self._prefix_len is None:
            self._prefix_len = len(self._decode(ids[: self._read_offset]))
        text = self._decode(ids)
        if flush or not self._is_incomplete(text):
            return self._emit(text, len(ids))
        # Several new tokens may end inside a character while an earlier one ends on a character
        # boundary: emit up to that boundary rather than hold the whole chunk back. An incomplete
        # character spans at most 3 bytes, so only the last few boundaries of this step's tokens
        # are worth trying (earlier steps tried theirs).
        lowest = max(self._read_offset, len(ids) - num_new, len(ids) - 3) + 1
        for end in range(len(ids) - 1, lowest - 1, -1):
            partial = self._decode(ids[:end])
            if not self._is_incomplete(partial):
                return self._emit(partial, end)
        if self._num_stalled_steps < _MAX_STALLED_STEPS:
            self._num_stalled_steps += 1
            return ""
        return self._emit(text, len(ids))

    def _is_incomplete(self, text: str) -> bool:
        """Whether a window decode must wait: it ends inside a character, or adds nothing yet."""
        assert self._prefix_len is not None
        return text.endswith(_REPLACEMENT_CHAR) or len(text) <= self._prefix_len

    def _emit(self, text: str, end: int) -> str:
        """Return the new part of `text` (the window decoded up to token `end`) and slide the window:
        the tokens just turned into text become the context for the next ones."""
        assert self._prefix_len is not None
        delta = text[self._prefix_len :]
        read_offset = self._read_offset
        del self._ids[:read_offset]
        self._read_offset = end - read_offset
        self._prefix_len = None
        self._num_stalled_steps = 0
        return delta

    # ---------------------------------------------------------------------- text and stops

    def _suffix(self, num_chars: int) -> str:
        """The last num_chars characters of the output, touching only the pieces that hold them."""
        parts: list[str] = []
        need = num_chars
        for piece in reversed(self._pieces):
            if need <= 0:
                break
            parts.append(piece[-need:])
            need -= len(piece)
        return "".join(reversed(parts))

    def _truncate(self, length: int) -> None:
        drop = self._length - length
        while drop > 0:
            piece = self._pieces.pop()
            if len(piece) > drop:
                self._pieces.append(piece[:-drop])
                break
            drop -= len(piece)
        self._length = length

    def _append(self, delta: str) -> str | None:
        """Add new text and look for a stop string that it completes."""
        if not delta:
            return None
        # Only a stop string ending inside the new text can be new: anything earlier was
        # searched on the step it arrived. So search the new text plus (longest stop - 1) before it.
        before = self._suffix(self._max_stop_len - 1) if self._max_stop_len > 1 else ""
        self._pieces.append(delta)
        self._length += len(delta)
        if not self.stop:
            return None

        window = before + delta
        best_start, best_stop = -1, ""
        for stop_str in self.stop:
            start = window.find(stop_str)
            if start == -1:
                continue
            # Earliest start wins; on a tie the shorter string, which was complete first.
            if best_start == -1 or (start, len(stop_str)) < (best_start, len(best_stop)):
                best_start, best_stop = start, stop_str
        if best_start == -1:
            return None

        cut = self._length - len(window) + best_start
        if self.include_stop_str_in_output:
            cut += len(best_stop)
        # The hold-back guarantees cut >= what get_delta already returned; see get_delta.
        self._truncate(cut)
        self.matched_stop = best_stop
        return best_stop
