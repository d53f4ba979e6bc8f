"""The SDK answers the operator's checkpoint request (an interruption notice) read from the pod's annotations file."""

import json
import time

import numpy as np
import pytest

from ckpt_sdk import Checkpointer, _notice
from ckpt_sdk._notice import parse_annotations
from ckpt_sdk.contract import format_time as stamp

REQUEST = "ckpt.dev/checkpoint-requested"


def write_annotations(path, values):
    """As the kubelet writes a downward-API map: sorted key="value" lines."""
    path.write_text("\n".join(f"{key}={json.dumps(value)}" for key, value in sorted(values.items())))


@pytest.fixture
def annotations(tmp_path, monkeypatch):
    path = tmp_path / "annotations"
    write_annotations(path, {"ckpt.dev/restart-reason": "none"})
    monkeypatch.setenv("CKPT_ANNOTATIONS_FILE", str(path))
    monkeypatch.setenv("CKPT_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setattr(_notice, "POLL_SECONDS", 0.0)  # read at every maybe_save in these tests
    return path


def test_the_kubelet_map_format_is_parsed():
    text = 'a="1"\nckpt.dev/checkpoint-requested="2026-01-01T00:02:00Z"\nquote="say \\"hi\\"\\n"\nbroken'
    assert parse_annotations(text) == {"a": "1", REQUEST: "2026-01-01T00:02:00Z", "quote": 'say "hi"\n'}


def test_a_request_saves_at_the_next_step_and_training_goes_on(tmp_path, annotations):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1000, handle_sigterm=False)
    state = {"w": np.zeros(4)}
    assert ckpt.maybe_save(1, state) is False  # nothing due, nothing asked
    deadline = stamp(time.time() + 120)
    write_annotations(annotations, {"ckpt.dev/restart-reason": "none", REQUEST: deadline})
    state["w"][:] = 7
    assert ckpt.maybe_save(2, state) is True  # saved, and no SystemExit: the operator moves the pod later
    assert [c.step for c in ckpt.checkpoints()] == [2]
    assert ckpt.maybe_save(3, state) is False  # the same request is answered once
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["step"] == 2 and message["checkpointRequested"] == deadline and "warning" not in message
    write_annotations(annotations, {REQUEST: stamp(time.time() + 60)})  # a new notice (another node, later)
    assert ckpt.maybe_save(4, state) is True
    assert [c.step for c in ckpt.checkpoints()] == [2, 4]


def test_a_request_that_cannot_be_met_in_time_says_so_before_trying(tmp_path, annotations, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1000, handle_sigterm=False)
    state = {"w": np.zeros(4)}
    ckpt.save(1, state)
    ckpt.policy.measured(30.0, 30.0)  # as if a save took 30 s
    write_annotations(annotations, {REQUEST: stamp(time.time() + 5)})
    assert ckpt.maybe_save(2, state) is True
    assert "are left before the node's interruption deadline" in caplog.text
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["step"] == 2 and "last durable checkpoint is step 1" in message["warning"]


def test_a_malformed_request_is_ignored_with_a_log_line(tmp_path, annotations, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1000, handle_sigterm=False)
    write_annotations(annotations, {REQUEST: "tomorrow"})
    assert ckpt.maybe_save(1, {"w": np.zeros(2)}) is False
    assert ckpt.checkpoints() == [] and "not an RFC 3339 time" in caplog.text


def test_without_the_file_nothing_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("CKPT_ANNOTATIONS_FILE", raising=False)
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1000, handle_sigterm=False)
    assert ckpt._requests.pending() is None and ckpt.maybe_save(1, {"w": np.zeros(2)}) is False
