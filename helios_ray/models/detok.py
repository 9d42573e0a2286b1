"""Incremental detokenization: constant work per token instead of re-decoding the output.

Re-decoding a sequence's whole output every step is quadratic in the output length.  :class:`IncrementalDecoder`
decodes only a short window per token with the prefix/read-offset method (vLLM, HF TGI): ``decode(ids[prefix:])``
minus ``decode(ids[prefix:read])`` is the text the new tokens add, exact for byte-level BPE and SentencePiece byte
fallback because both windows start at the same token, so any decoder quirk at a window's first token (a stripped
leading space) cancels out.  Text that ends in U+FFFD is an incomplete UTF-8 character (bytes split across tokens):
it is held until a later token completes it, or flushed as is when the sequence ends - what a full ``decode()`` of
the same ids returns.

It is a tokenizer matter, so it lives with the models: the model's own reference loop
(:meth:`~helios_ray.models.early_exit.EarlyExitLM.generate_stream`) and the engine's stop-string stream
(:class:`~helios_ray.engine.detok.TextStream`) both use it.

Why not ``tokenizers.decoders.DecodeStream``: it cannot flush an incomplete character at the end of a sequence
(``decode()`` returns U+FFFD there, and so must we) and it needs the raw Rust tokenizer.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


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
        if tail.endswith(REPLACEMENT):
            return "", tail
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read]) if self._prefix < self._read else ""
        return tail, ""

    def pending(self) -> str:
        """What the tokens after the last settled point decode to now ("" when everything is settled)."""
        if self._read == len(self.ids):
            return ""
        return self._decode(self.ids[self._prefix:])[len(self._prefix_text):]
