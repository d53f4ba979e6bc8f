"""The monitoring helpers without TensorBoard installed: TFRecord framing, Event.step, torn tails, the metrics log."""

from __future__ import annotations

import json
import struct

import pytest

from ckpt_sdk import MetricsLog
from ckpt_sdk._monitoring import _masked_crc32c, event_records, event_step, truncate_event_files


def _event(step: int | None, payload: bytes = b"") -> bytes:
    """A serialized Event: wall_time (field 1, fixed64), step (field 2, varint), file_version-like bytes (field 3)."""
    body = b"\x09" + struct.pack("<d", 1.5)
    if step is not None:
        value, varint = step & (2**64 - 1), b""
        while True:
            byte, value = value & 0x7F, value >> 7
            varint += bytes([byte | (0x80 if value else 0)])
            if not value:
                break
        body += b"\x10" + varint
    return body + b"\x1a" + bytes([len(payload)]) + payload


def _record(event: bytes) -> bytes:
    length = struct.pack("<Q", len(event))
    return length + struct.pack("<I", _masked_crc32c(length)) + event + b"\0\0\0\0"


def test_masked_crc32c_matches_tfrecord_known_values():
    assert _masked_crc32c(b"") == ((0 >> 15 | 0 << 17) + 0xA282EAD8) & 0xFFFFFFFF
    assert _masked_crc32c(b"123456789") == (((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40, -1])
def test_event_step_reads_the_varint_field(step):
    assert event_step(_event(step, b"x" * 5)) == step


def test_an_event_without_a_step_is_step_zero():
    assert event_step(_event(None, b"brain.Event:2")) == 0


def test_records_stop_at_a_torn_tail_and_at_a_damaged_length():
    data = _record(_event(None)) + _record(_event(1)) + _record(_event(2))
    assert [step for _, _, step in event_records(data)] == [0, 1, 2]
    assert [step for _, _, step in event_records(data[:-3])] == [0, 1]  # killed mid-write
    damaged = bytearray(data)
    damaged[len(_record(_event(None)))] ^= 0xFF  # the second record's length no longer matches its checksum
    assert [step for _, _, step in event_records(bytes(damaged))] == [0]


def test_truncation_keeps_the_header_and_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "run" / "events.out.tfevents.1.host.1.0"
    path.parent.mkdir()
    path.write_bytes(b"".join(_record(_event(step)) for step in (None, 1, 2, 3, 4)) + b"torn")
    assert truncate_event_files(tmp_path, 2) == 2
    assert [step for _, _, step in event_records(path.read_bytes())] == [0, 1, 2]
    assert path.read_bytes() == b"".join(_record(_event(step)) for step in (None, 1, 2))  # records copied as they were
    assert truncate_event_files(tmp_path, 2) == 0  # nothing more to drop: the file is left alone


def test_truncation_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "outside.tfevents"
    outside.write_bytes(_record(_event(5)))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.out.tfevents.link").symlink_to(outside)
    assert truncate_event_files(tmp_path / "logs", 1) == 0
    assert outside.read_bytes() == _record(_event(5))


def test_the_metrics_log_drops_lines_past_the_resumed_step_and_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, resumed_step=0) as metrics:
        for step in range(1, 6):
            metrics.log(step, loss=1.0 / step)
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    with MetricsLog(path, resumed_step=3) as metrics:
        assert metrics.dropped == 3
        metrics.log(4, loss=0.5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_the_metrics_log_refuses_a_negative_step_and_writes_after_close(tmp_path):
    with pytest.raises(ValueError, match="resumed_step"):
        MetricsLog(tmp_path / "m.jsonl", resumed_step=-1)
    metrics = MetricsLog(tmp_path / "m.jsonl", resumed_step=0)
    metrics.close()
    with pytest.raises(ValueError, match="closed"):
        metrics.log(1, loss=1.0)


def test_a_file_with_nothing_left_is_removed(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host.1.0"
    path.write_bytes(_record(_event(None)) + _record(_event(1)))
    assert truncate_event_files(tmp_path, -1) == 2
    assert not path.exists()
