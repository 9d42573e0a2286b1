"""Incremental detokenization and stop strings: constant work per token instead of re-decoding the output.

Re-decoding a sequence's whole output every step (and searching all of it for stop strings) is quadratic in the
output length.  :class:`IncrementalDecoder` decodes only a short window per token with the prefix/read-offset
method (vLLM, HF TGI): ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the text the new tokens
add, exact for byte-level BPE and SentencePiece byte fallback because both windows start at the same token, so
any decoder quirk at a window's first token (a stripped leading space) cancels out.  Text that ends in U+FFFD is
an incomplete UTF-8 character (bytes split across tokens): it is held until a later token completes it, or
flushed as is when the sequence ends - what a full ``decode()`` of the same ids returns.

:class:`TextStream` applies the same stop rules as :func:`~helios_ray.engine.sequence.finish_text` (the full-text
reference, kept for one-shot use and as the tests' oracle) to the new text only: it searches stop strings in the
new text plus a carried tail of ``max(len(stop)) - 1`` characters, and holds back a tail that could begin a stop
string so a stop string is never half streamed.  Tests check that both give identical streams.

Why not ``tokenizers.decoders.DecodeStream``: it cannot flush an incomplete character at the end of a sequence
(``decode()`` returns U+FFFD there, and so must we) and it needs the raw Rust tokenizer.
"""

from __future__ import annotations

from typing import Any

from helios_ray.engine.sequence import SamplingParams, _stop_prefix_len

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Exact incremental ``tokenizer.decode(ids, skip_special_tokens=True)`` for one growing list of ids."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # the Rust decoder directly: same text (no Python post-processing is configured), ~5x less overhead
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are settled and out of the window
        self._read = 0  # tokens before this are settled text
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def add(self, token: int) -> tuple[str, str]:
        """Append a token; returns ``(settled new text, pending text)``.  The pending text is what the
        tokens since the last settled point decode to now - it ends with U+FFFD (an incomplete character);
        its part before the trailing U+FFFD run is already final and is included in the settled text."""
        self.ids.append(token)
        new_text = self._decode(self.ids[self._prefix:])
        tail = new_text[len(self._prefix_text):]
        if tail.endswith(_REPLACEMENT):
            return "", tail
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read]) if self._prefix < self._read else ""
        return tail, ""


class TextStream:
    """One sequence's streamed text: incremental decoding plus the stop-string rules of ``finish_text``."""

    def __init__(self, tokenizer: Any, params: SamplingParams):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = list(params.stop)
        self._carry = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # stable text: settled text + the final part of the pending text (cut at a stop when done)
        self.emitted = 0  # chars of ``text`` already streamed
        self._settled = ""  # text that no later token changes (without the pending part)
        self._searched = 0  # stop strings were searched in text[:_searched]

    @classmethod
    def resumed(cls, tokenizer: Any, params: SamplingParams, already: list[int]) -> "TextStream":
        """A stream continuing after ``already`` - tokens a replica that died had streamed: they are decoded
        (so the next token's text joins them exactly as in the uninterrupted run) but not streamed again."""
        stream = cls(tokenizer, params)
        for token in already:
            stream.add(token)
        return stream

    def add(self, token: int | None, is_eos: bool = False, at_length: bool = False) -> tuple[str, str | None]:
        """Feed the next visible token (``None`` when the sequence ends on a token that is not shown, e.g. EOS).
        Returns ``(text to stream now, finish reason or None)`` - the same as ``finish_text`` on the full
        decode of the visible ids would."""
        pending = ""
        if token is not None:
            settled, pending = self.decoder.add(token)
            self._settled += settled
        else:
            pending = self._pending_now()
        final_part = pending.rstrip(_REPLACEMENT)
        self.text = self._settled + final_part
        reason = None
        start = max(0, self._searched - self._carry)
        window = self.text[start:]
        for stop in self.stops:  # list order, as finish_text: the first stop that occurs wins
            idx = window.find(stop)
            if idx >= 0:
                self.text, reason = self.text[:start + idx], "stop"
                break
        self._searched = len(self.text)
        if reason is None and (is_eos or at_length):
            reason = "stop" if is_eos else "length"
            self.text += pending[len(final_part):]  # an incomplete character at the end is shown as decode() does
        stable = len(self.text)
        if reason is None:
            stable -= _stop_prefix_len(self.text[max(0, stable - self._carry):], self.stops)
        delta = self.text[self.emitted:stable]
        self.emitted = max(self.emitted, stable)
        return delta, reason

    def _pending_now(self) -> str:
        d = self.decoder
        if d._read == len(d.ids):
            return ""
        return d._decode(d.ids[d._prefix:])[len(d._prefix_text):]
