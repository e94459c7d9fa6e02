"""Decoding events off the wire (CONTRACT section 1): bad input raises InvalidEvent.

Every reason is one readable line that names what is wrong, because it is shown
as is in the quarantine.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger.core.events import (
    EVENT_TYPES,
    RunExited,
    RunHeartbeat,
    SweepPaused,
    decode_event,
    encode_event,
    subject_of,
    tag_of,
)
from ledger.errors import InvalidEvent

AT = "2024-05-01T12:00:00+02:00"
GOLDEN = Path(__file__).parent / "golden"
GOLDEN_SUBJECTS: dict[str, str] = json.loads((GOLDEN / "index.json").read_text())
"""Golden payload file name -> the subject it was published on."""
SUBJECT = "ledger.run.r1.exited"


def payload(**changes: Any) -> dict[str, Any]:
    """A valid ``run.exited`` payload of run ``r1``, with changes (``None`` drops a field)."""
    data = {"type": "run.exited", "id": "ev-1", "at": AT, "run_id": "r1", "exit_code": 0, **changes}
    return {key: value for key, value in data.items() if value is not None}


def raw(**changes: Any) -> bytes:
    """The JSON bytes of ``payload(**changes)``."""
    return json.dumps(payload(**changes)).encode()


def reason(subject: str, data: bytes) -> str:
    """The reason decode_event gives for rejecting ``data`` on ``subject``."""
    with pytest.raises(InvalidEvent) as caught:
        decode_event(subject, data)
    assert "\n" not in caught.value.reason
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


class TestDecodeEvent:
    def test_valid_event(self) -> None:
        """A well-formed payload on its own subject decodes to its event."""
        expected = RunExited(
            id="ev-1", at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC), run_id="r1", exit_code=0
        )
        assert expected == decode_event(SUBJECT, raw())

    def test_memoryview(self) -> None:
        """A payload handed over as a memoryview decodes like bytes."""
        assert decode_event(SUBJECT, raw()) == decode_event(SUBJECT, memoryview(raw()))

    def test_unknown_fields_are_accepted(self) -> None:
        """Unknown extra fields (a newer producer's) are accepted and ignored."""
        assert decode_event(SUBJECT, raw()) == decode_event(SUBJECT, raw(gpu="a100", extra={"x": [1]}))

    def test_version_is_optional(self) -> None:
        """``v`` defaults to 1."""
        assert 1 == decode_event(SUBJECT, raw()).v

    def test_offset_is_kept_as_instant(self) -> None:
        """A time with any offset decodes to the same instant."""
        utc = decode_event(SUBJECT, raw(at="2024-05-01T10:00:00Z")).at
        assert utc == decode_event(SUBJECT, raw()).at

    def test_sweep_event(self) -> None:
        """A sweep event decodes on its sweep subject."""
        data = b'{"type": "sweep.paused", "id": "ev-1", "at": "2024-05-01T12:00:00Z", "sweep_id": "s1"}'
        assert SweepPaused == type(decode_event("ledger.sweep.s1.paused", data))

    def test_round_trip(self) -> None:
        """An encoded event decodes to itself on its subject."""
        event = RunHeartbeat(id="ev-9", at=datetime(2024, 5, 1, tzinfo=UTC), run_id="r1", step=3)
        assert event == decode_event(subject_of(event), encode_event(event))


class TestDecodeEventRejects:
    @pytest.mark.parametrize(
        ("data", "words"),
        [
            pytest.param(b"nope", "not JSON", id="garbage"),
            pytest.param(b"", "not JSON", id="empty"),
            pytest.param(b'{"type": "run.exited", "id": ', "not JSON", id="truncated"),
            pytest.param(b'{"type": "run.exited", "progress": NaN}', "not JSON", id="nan"),
            pytest.param(b'{"type": "run.ex\xffited"}', "not UTF-8", id="invalid-utf8"),
            pytest.param(b"\xef\xbb\xbf" + raw(), "not JSON", id="utf8-bom"),
        ],
    )
    def test_not_json(self, data: bytes, words: str) -> None:
        """Bytes that are not UTF-8 JSON are rejected as such."""
        assert words in reason(SUBJECT, data)

    @pytest.mark.parametrize(
        "data", [b"[1, 2]", b'"run.exited"', b"42", b"null", b"true"], ids=["array", "string", "number", "null", "bool"]
    )
    def test_json_but_not_an_object(self, data: bytes) -> None:
        """JSON that is not an object is rejected, naming what it got."""
        assert "Expected `object`" in reason(SUBJECT, data)

    def test_deeply_nested_json(self) -> None:
        """JSON nested thousands deep (small, but a stack bomb) is rejected, not raised through."""
        config = b"[" * 5000 + b"]" * 5000
        data = raw()[:-1] + b', "config": ' + config + b"}"
        assert "nested too deeply" in reason(SUBJECT, data)

    def test_unknown_type(self) -> None:
        """An unknown ``type`` is rejected, naming the value."""
        assert "'run.exploded'" in reason("ledger.run.r1.exploded", raw(type="run.exploded"))

    @pytest.mark.parametrize("field", ["type", "id", "at", "run_id", "exit_code"])
    def test_missing_field(self, field: str) -> None:
        """A payload without a required field is rejected, naming the field."""
        data = json.dumps({k: v for k, v in payload().items() if k != field}).encode()
        assert f"missing required field `{field}`" in reason(SUBJECT, data)

    def test_missing_crash_reason(self) -> None:
        """``run.crashed`` requires its reason."""
        data = raw(type="run.crashed", exit_code=None)
        assert "`reason`" in reason("ledger.run.r1.crashed", data)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            pytest.param({"exit_code": "0"}, "exit_code", id="exit_code-str"),
            pytest.param({"exit_code": True}, "exit_code", id="exit_code-bool"),
            pytest.param({"exit_code": 1.5}, "exit_code", id="exit_code-float"),
            pytest.param({"exit_code": 2**64}, "exit_code", id="exit_code-beyond-int64"),
            pytest.param({"signal": -(2**63) - 1}, "signal", id="signal-beyond-int64"),
            pytest.param({"signal": "SIGKILL"}, "signal", id="signal-str"),
            pytest.param({"id": 7}, "id", id="id-int"),
            pytest.param({"at": 1714557600}, "at", id="at-epoch"),
            pytest.param({"attempt": 0}, "attempt", id="attempt-zero"),
            pytest.param({"attempt": "1"}, "attempt", id="attempt-str"),
            pytest.param({"v": "1"}, "v", id="v-str"),
            pytest.param({"type": "run.heartbeat", "step": -1}, "step", id="step-negative"),
            pytest.param({"type": "run.heartbeat", "progress": 1.5}, "progress", id="progress-above-1"),
            pytest.param({"type": "run.heartbeat", "step": 2**63}, "step", id="step-beyond-int64"),
            pytest.param({"type": "run.started", "resume": "sometimes"}, "resume", id="resume-unknown"),
            pytest.param({"type": "run.started", "command": "python train.py"}, "command", id="command-str"),
            pytest.param({"type": "run.queued", "config": [1]}, "config", id="config-list"),
        ],
    )
    def test_mistyped_field(self, changes: dict[str, Any], field: str) -> None:
        """A field of the wrong type or out of range is rejected, naming the field."""
        tag = changes.get("type", "run.exited")
        subject = f"ledger.run.r1.{tag.split('.')[1]}"
        exit_code = 0 if tag == "run.exited" else None
        assert f"$.{field}`" in reason(subject, raw(**{"exit_code": exit_code, **changes}))

    @pytest.mark.parametrize(
        "at",
        ["2024-05-01T12:00:00", "2024-05-01 12:00:00", "2024-05-01", "yesterday", "2024-05-01T12:00:00+25:00"],
        ids=["no-offset", "no-offset-space", "date-only", "words", "bad-offset"],
    )
    def test_time_without_offset(self, at: str) -> None:
        """A time that is not RFC 3339 with an offset is rejected, naming the field."""
        assert "$.at`" in reason(SUBJECT, raw(at=at))

    def test_naive_time_says_timezone(self) -> None:
        """A time without offset is rejected because it lacks its timezone."""
        assert "timezone" in reason(SUBJECT, raw(at="2024-05-01T12:00:00"))

    @pytest.mark.parametrize(
        "subject",
        [
            "ledger.run.r1.finished",
            "ledger.run.r1.heartbeat",
            "ledger.sweep.r1.exited",
            "ledger.run.r2.exited",
            "ledger.run.r1.exited.extra",
            "ledger.run.r1",
            "other.run.r1.exited",
            "ledger.run.r1.exited ",
            "",
        ],
        ids=["other-name", "other-type", "other-kind", "other-run", "too-long", "too-short", "other-prefix",
             "trailing-space", "empty"],
    )
    def test_subject_disagrees(self, subject: str) -> None:
        """A payload whose type or id disagrees with its subject is rejected, naming both."""
        text = reason(subject, raw())
        assert (True, True) == (repr(subject) in text, "'ledger.run.r1.exited'" in text)

    def test_sweep_subject_disagrees(self) -> None:
        """A sweep event on another sweep's subject is rejected."""
        data = b'{"type": "sweep.paused", "id": "ev-1", "at": "2024-05-01T12:00:00Z", "sweep_id": "s1"}'
        assert "disagrees" in reason("ledger.sweep.s2.paused", data)

    @pytest.mark.parametrize(
        "unsafe",
        ["r.1", "r*", ">", "r 1", "r1\n", "", "ü", "r/1", "r" * 129],
        ids=["dot", "star", "gt", "space", "trailing-newline", "empty", "non-ascii", "slash", "129-chars"],
    )
    def test_unsafe_run_id(self, unsafe: str) -> None:
        """A run id outside 1-128 of [A-Za-z0-9_-] is rejected, naming the field."""
        assert "$.run_id`" in reason(f"ledger.run.{unsafe}.exited", raw(run_id=unsafe))

    @pytest.mark.parametrize(
        "unsafe",
        ["ev.1", "ev*", ">", "ev 1", "ev-1\n", "", "e" * 65, "e" * 200],
        ids=["dot", "star", "gt", "space", "trailing-newline", "empty", "65-chars", "200-chars"],
    )
    def test_unsafe_event_id(self, unsafe: str) -> None:
        """An event id outside 1-64 of [A-Za-z0-9_-] is rejected, naming the field."""
        assert "$.id`" in reason(SUBJECT, raw(id=unsafe))

    def test_unsafe_sweep_id(self) -> None:
        """A sweep id of 200 characters is rejected, naming the field."""
        long = "s" * 200
        data = json.dumps({"type": "sweep.paused", "id": "ev-1", "at": AT, "sweep_id": long}).encode()
        assert "$.sweep_id`" in reason(f"ledger.sweep.{long}.paused", data)

    def test_unsafe_cause(self) -> None:
        """A ``run.killed`` whose cause is not an event id is rejected, naming the field."""
        data = raw(type="run.killed", exit_code=None, cause="ev 1")
        assert "$.cause`" in reason("ledger.run.r1.killed", data)

    def test_int64_bounds_are_accepted(self) -> None:
        """Ints at the ends of the signed 64-bit range (what SQLite stores) are valid."""
        event = decode_event(SUBJECT, raw(exit_code=2**63 - 1, signal=-(2**63)))
        assert (2**63 - 1, -(2**63)) == (event.exit_code, event.signal)

    def test_longest_ids_are_accepted(self) -> None:
        """Ids of exactly 64 (event) and 128 (run) characters are valid."""
        run_id, event_id = "r" * 128, "e" * 64
        event = decode_event(f"ledger.run.{run_id}.exited", raw(run_id=run_id, id=event_id))
        assert (run_id, event_id) == (event.run_id, event.id)

    def test_one_megabyte_payload(self) -> None:
        """A 1 MB payload is rejected for its size, before any parsing."""
        data = raw(message="x" * (1024 * 1024))
        assert "too large" in reason(SUBJECT, data)

    def test_times_in_any_offset_are_accepted(self) -> None:
        """A time with a negative offset and fractions of a second is valid."""
        event = decode_event(SUBJECT, raw(at="2024-05-01T05:00:00.123456-05:00"))
        expected = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=timezone(timedelta(0)))
        assert expected == event.at


class TestGolden:
    """Committed payloads of every event type: what producers send today must decode forever."""

    def test_index_covers_every_file_and_type(self) -> None:
        """The index names every golden payload, and there is one for every event type."""
        files = {path.name for path in GOLDEN.glob("*.json")} - {"index.json"}
        assert (files, set(EVENT_TYPES)) == (set(GOLDEN_SUBJECTS), {name.removesuffix(".json") for name in files})

    @pytest.mark.parametrize(("name", "subject"), sorted(GOLDEN_SUBJECTS.items()))
    def test_decodes(self, name: str, subject: str) -> None:
        """The golden payload decodes on its subject to the event type it is named after."""
        event = decode_event(subject, (GOLDEN / name).read_bytes())
        assert name.removesuffix(".json") == tag_of(event)

    @pytest.mark.parametrize(("name", "subject"), sorted(GOLDEN_SUBJECTS.items()))
    def test_fields_keep_their_values(self, name: str, subject: str) -> None:
        """Every known field of the golden payload decodes to the value written in it."""
        data = json.loads((GOLDEN / name).read_bytes())
        event = decode_event(subject, (GOLDEN / name).read_bytes())
        known = {field.name for field in msgspec.structs.fields(event)}
        written = {key: value for key, value in data.items() if key in known}
        decoded = {key: getattr(event, key) for key in written}
        times = {key for key, value in decoded.items() if isinstance(value, datetime)}
        assert {k: datetime.fromisoformat(v) if k in times else v for k, v in written.items()} == decoded

    @pytest.mark.parametrize(("name", "subject"), sorted(GOLDEN_SUBJECTS.items()))
    def test_reencodes(self, name: str, subject: str) -> None:
        """A decoded golden event encodes back to a payload that decodes to the same event."""
        event = decode_event(subject, (GOLDEN / name).read_bytes())
        assert event == decode_event(subject, encode_event(event))


class TestIds:
    def test_new_ids_are_unique_safe_and_time_ordered(self) -> None:
        """Generated ids are 26-char ULIDs, valid event and entity ids, distinct, and ordered by millisecond."""
        import time

        from ledger.core.events import ENTITY_ID_RE, EVENT_ID_RE
        from ledger.ids import new_id

        first = [new_id() for _ in range(1000)]
        time.sleep(0.002)  # crossing a millisecond boundary is the behaviour under test, not a synchronisation
        later = new_id()
        assert 1000 == len(set(first))
        assert all(len(i) == 26 and EVENT_ID_RE.match(i) and ENTITY_ID_RE.match(i) for i in first)
        assert max(i[:10] for i in first) < later[:10]
