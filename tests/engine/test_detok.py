"""Incremental detokenization streams exactly what re-decoding the whole output with ``finish_text`` streams.

The oracle is the old per-token rule: ``finish_text(tokenizer.decode(visible ids), ...)`` at every step.  Both
real tokenizers are checked - SmolLM2 (byte-level BPE: an emoji or CJK character can span tokens) and Gemma 3
(SentencePiece with byte-fallback tokens ``<0xF0>`` ...) - on real text, on hand-made byte-fallback runs and on
random token ids (which produce invalid UTF-8 and lone continuation bytes).
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from helios_ray.engine.detok import TextStream
from helios_ray.models.detok import IncrementalDecoder
from helios_ray.engine.sequence import SamplingParams, finish_text
from helios_ray.models.repository import ModelRepository

TEXTS = [
    "Hello, world! 😀 Café naïve — “quotes” 日本語のテキスト 🇫🇷 👩‍👩‍👧 ok.",
    "中文字符和emoji混合🙂🙃，还有한국어 and Ελληνικά 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces\n\nnewlines\tand tabs 🤖🤖🤖 end",
]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return {x: chr(c) for x, c in zip(bs, cs)}


_BYTE_CHARS = _byte_chars()


def _tokenizer(name: str):
    d = ModelRepository().checkpoint_dir(name, required=False)
    if d is None:
        pytest.skip(f"{name} is not prepared on this machine")
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def tok(request):
    return _tokenizer(request.param)


def _oracle(tok, ids: list[int], params: SamplingParams, eos_at_end: bool) -> list[tuple[str, str | None]]:
    out, emitted = [], 0
    for i in range(len(ids)):
        last = i == len(ids) - 1
        eos = eos_at_end and last
        visible = ids[:i] if eos else ids[:i + 1]
        _, reason, delta, emitted = finish_text(tok.decode(visible, skip_special_tokens=True), params, eos,
                                                last and not eos, emitted)
        out.append((delta, reason))
        if reason:
            break
    return out


def _stream(tok, ids: list[int], params: SamplingParams, eos_at_end: bool) -> list[tuple[str, str | None]]:
    s, out = TextStream(tok, params), []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        eos = eos_at_end and last
        out.append(s.add(None if eos else t, eos, last and not eos))
        if out[-1][1]:
            break
    return out


def _check(tok, ids: list[int], stops: list[str] = ()) -> None:
    for eos in (False, True):
        params = SamplingParams(max_tokens=max(1, len(ids)), stop=list(stops))
        assert _stream(tok, ids, params, eos) == _oracle(tok, ids, params, eos), (ids, stops, eos)


def test_multibyte_text_streams_exactly(tok):
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        _check(tok, ids)
        pieces = "".join(d for d, _ in _stream(tok, ids, SamplingParams(max_tokens=len(ids)), False))
        assert pieces == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_never_half_streamed(tok):
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for stops in (["日本"], ["🤖🤖"], ["world", "naïve"], ["é", "xyz"], ["ok.", "🙃，"], ["Ελλη", "한국"],
                      ["\n\n"], ["not there at all"]):
            _check(tok, ids, stops)
            for delta, _ in _stream(tok, ids, SamplingParams(max_tokens=len(ids), stop=stops), False):
                assert not any(s in delta for s in stops)


def test_byte_fallback_and_split_characters(tok):
    vocab = tok.get_vocab()
    if "<0xF0>" in vocab:  # SentencePiece byte fallback: 😀 = F0 9F 98 80, 日 = E6 97 A5
        b = lambda *xs: [vocab[f"<0x{x:02X}>"] for x in xs]  # noqa: E731
        word = tok("word", add_special_tokens=False)["input_ids"]
        runs = [b(0xF0, 0x9F, 0x98, 0x80), word + b(0xE6, 0x97, 0xA5) + word, b(0xE6, 0x97) + word,
                b(0x97, 0xA5) + word, word + b(0xF0, 0x9F)]
    else:  # byte-level BPE: split a character's bytes over single-byte tokens
        b = lambda *xs: [vocab[_BYTE_CHARS[x]] for x in xs]  # noqa: E731
        word = tok("word", add_special_tokens=False)["input_ids"]
        runs = [b(0xF0, 0x9F, 0x98, 0x80), word + b(0xE6, 0x97, 0xA5) + word, b(0xE6, 0x97) + word,
                b(0x97, 0xA5) + word, word + b(0xF0, 0x9F)]
    for ids in runs:
        _check(tok, ids)
        _check(tok, ids, ["日"])


def test_random_ids_including_invalid_utf8(tok):
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(25):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        _check(tok, ids)
        _check(tok, ids, ["a", "\n"])


def test_decoder_pieces_concatenate_to_the_full_decode(tok):
    ids = tok(TEXTS[0] + TEXTS[1], add_special_tokens=False)["input_ids"]
    d = IncrementalDecoder(tok)
    text = "".join(d.add(t)[0] for t in ids)
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_a_resumed_stream_joins_what_was_already_streamed(tok):
    """Resuming after any k tokens (a replica died there): what the original stream had sent for its first k
    tokens, followed by what the resumed stream sends, is exactly the uninterrupted stream - also when k splits a
    multi-byte character, whose first bytes were held back and never sent."""
    params = SamplingParams(max_tokens=10_000, stop=["\n\nnewlines"])
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        full = _stream(tok, ids, params, False)
        whole = "".join(d for d, _ in full)
        for k in range(1, len(full)):
            resumed = TextStream.resumed(tok, params, ids[:k])
            rest = [resumed.add(t, False, i == len(ids) - 1) for i, t in enumerate(ids[k:], start=k)]
            sent = "".join(d for d, _ in full[:k]) + "".join(d for d, _ in rest)
            assert sent == whole, (text, k)
