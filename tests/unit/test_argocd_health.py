"""The Argo CD health check (examples/argocd-health.lua) run by Lua 5.1, the language of Argo CD's gopher-lua."""

from pathlib import Path

import pytest

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (Lua 5.1) is a dev dependency")
SCRIPT = (Path(__file__).parents[2] / "examples" / "argocd-health.lua").read_text()


def health(obj):
    """Run the script as Argo CD does: `obj` is the resource, the script returns {status, message}."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    runtime.globals().obj = to_lua(obj)
    result = runtime.execute(SCRIPT)
    return result["status"], result["message"]


def job(generation=1, **status):
    return {"metadata": {"name": "x", "generation": generation}, "status": {"observedGeneration": 1, **status}}


@pytest.mark.parametrize(("obj", "expected"), [
    ({"metadata": {"name": "x"}}, "Progressing"),
    (job(phase="Running", attempt=2, preemptions=2, lastCheckpoint={"step": 400}), "Progressing"),
    (job(phase="Preempted"), "Progressing"),
    (job(phase="Pending", conditions=[{"type": "Running", "status": "False", "reason": "Unschedulable",
                                       "message": "0/2 nodes are available"}]), "Progressing"),
    (job(phase="Succeeded", lastCheckpoint={"step": 1000}), "Healthy"),
    (job(phase="Failed", conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "4 application failures exceed backoffLimit=3"}]), "Degraded"),
    (job(phase="Suspended"), "Suspended"),
    (job(generation=2, phase="Succeeded"), "Progressing"),  # the new spec is not acted on yet
])
def test_health_by_phase(obj, expected):
    assert health(obj)[0] == expected


def test_messages_say_what_is_happening():
    assert health(job(phase="Running", attempt=2, preemptions=2, lastCheckpoint={"step": 400}))[1] == \
        "Running, attempt 2, 2 preemption(s), checkpoint step 400"
    assert "0/2 nodes are available" in health(job(phase="Pending", conditions=[
        {"type": "Running", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes are available"}]))[1]
    assert health(job(phase="Failed", conditions=[{"type": "Failed", "status": "True", "reason": "NoProgress",
                                                   "message": "5 attempts made no progress"}]))[1] == \
        "5 attempts made no progress"
