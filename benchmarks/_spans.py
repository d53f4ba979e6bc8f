"""What the multi-rank benchmarks share: the wall time of each timed call across all ranks."""

from __future__ import annotations

import json
import subprocess


def rank_spans(procs: list[subprocess.Popen[str]]) -> list[float]:
    """Wait for every rank (each prints a JSON list of [start, end] times last); for each timed call, the seconds
    from the first rank's start to the last rank's end."""
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"a rank failed with exit code {proc.returncode}")
        spans.append(json.loads(out.strip().splitlines()[-1]))
    return [max(rank[i][1] for rank in spans) - min(rank[i][0] for rank in spans) for i in range(len(spans[0]))]
