"""Trace format: round trip, tolerance, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helios_ray.control import TraceError, TraceRequest, TraceToken, read_trace, write_trace
from helios_ray.control.trace import parse_record


def _records() -> list[TraceToken | TraceRequest]:
    return [
        TraceToken(
            model="smollm2-135m",
            request=17,
            kind="chat",
            pos=3,
            exits={12: (5, 0.31), 20: (9, 0.93, -1.5), 30: (9, 0.97)},
            final=9,
            final_logprob=-0.05,
        ),
        TraceRequest(
            model="smollm2-135m",
            request=17,
            kind="chat",
            prompt_tokens=12,
            output_tokens=4,
            seconds=0.5,
            ttft_s=0.1,
        ),
    ]


def test_round_trip_keeps_int_depths_and_optional_logprob(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    assert write_trace(path, _records()) == 2
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    # JSON keys are strings, the third element only when known, None fields omitted.
    assert first["exits"] == {"12": [5, 0.31], "20": [9, 0.93, -1.5], "30": [9, 0.97]}
    assert "energy_j" not in json.loads(lines[1])
    back = read_trace(path)
    assert back == _records()
    tok = back[0]
    assert isinstance(tok, TraceToken)
    assert sorted(tok.exits) == [12, 20, 30]
    assert tok.exits[20].full_logprob == -1.5 and tok.exits[30].full_logprob is None


def test_served_and_agreement_follow_greedy_exit() -> None:
    tok = _records()[0]
    assert isinstance(tok, TraceToken)
    assert tok.served(12) is not None and tok.served(12).token == 5  # type: ignore[union-attr]
    assert tok.agrees(12) is False and tok.agrees(20) is True
    assert tok.served(16) is None  # not evaluated: nothing to serve
    no_full = TraceToken(model="m", request=1, pos=0, exits={12: (5, 0.3)}, final=9)
    # Deeper than every recorded exit: the full model's token, confidence unknown -> 1.0.
    served = no_full.served(30)
    assert served is not None and (served.token, served.confidence) == (9, 1.0)


def test_blank_lines_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    body = "\n".join(r.model_dump_json() for r in _records())
    path.write_text("\n\n" + body.replace("\n", "\n   \n") + "\n\n")
    assert len(read_trace(path)) == 2


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '{"type":"token","model":"m","request":1,"pos":0,"exits":{"12":[3,1.5]},"final":3}',
            ":3: bad token record: exits.12.confidence: Input should be less than or equal to 1",
        ),
        ('{"type":"token","model":"m"', ":3: not valid JSON"),
        ('{"type":"tokens","model":"m"}', ":3: unknown record type 'tokens'"),
        ('[1, 2]', ":3: a record must be a JSON object"),
        (
            '{"type":"request","model":"m","request":1,"output_tokens":3}',
            ":3: bad request record: seconds: Field required",
        ),
        (
            '{"type":"token","model":"m","request":1,"pos":0,"exits":{"12":[3]},"final":3}',
            ":3: bad token record: exits.12",
        ),
    ],
)
def test_bad_record_names_the_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "t.jsonl"
    good = _records()[0].model_dump_json()
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    assert expected in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        read_trace("/nonexistent/trace.jsonl")


def test_extra_keys_are_ignored_for_forward_compatibility() -> None:
    rec = parse_record(
        '{"type":"request","model":"m","request":1,"output_tokens":3,"seconds":1.0,"gpu":"x"}'
    )
    assert isinstance(rec, TraceRequest) and rec.output_tokens == 3


def test_exit_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="exit depths must be >= 1"):
        TraceToken(model="m", request=1, pos=0, exits={0: (1, 0.5)}, final=1)
