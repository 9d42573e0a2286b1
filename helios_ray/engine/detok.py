"""Streamed text with stop strings: constant work per token instead of re-decoding and re-searching the output.

Re-decoding a sequence's whole output every step (and searching all of it for stop strings) is quadratic in the
output length.  Decoding is incremental (:class:`~helios_ray.models.detok.IncrementalDecoder`, a tokenizer matter
that lives with the models).

:class:`TextStream` applies the same stop rules as :func:`~helios_ray.engine.sequence.finish_text` (the full-text
reference, kept for one-shot use and as the tests' oracle) to the new text only: it searches stop strings in the
new text plus a carried tail of ``max(len(stop)) - 1`` characters, and holds back a tail that could begin a stop
string so a stop string is never half streamed.  Tests check that both give identical streams.
"""

from __future__ import annotations

from typing import Any

from helios_ray.engine.sequence import SamplingParams, _stop_prefix_len
from helios_ray.models.detok import REPLACEMENT as _REPLACEMENT
from helios_ray.models.detok import IncrementalDecoder


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
            pending = self.decoder.pending()
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

