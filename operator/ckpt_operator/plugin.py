"""kubectl-ckpt: `kubectl ckpt describe|suspend|resume|restart|checkpoints|logs JOB` for TrainingJobs.

    kubectl ckpt describe JOB [-o json]          status, per-attempt history, ranks, timeline
    kubectl ckpt suspend JOB                     checkpoint and stop; `resume` continues
    kubectl ckpt resume JOB [-f F] [--set P=V]   continue (also a Succeeded or Failed job), with spec overrides
    kubectl ckpt restart JOB [--fresh | --from-step N] [--copy [NEW]] [-f F] [--set P=V]
    kubectl ckpt checkpoints JOB                 list the job's checkpoints (a short-lived pod reads its storage)
    kubectl ckpt logs JOB [--attempt N] [--rank R]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from kubernetes import config
from kubernetes.client.exceptions import ApiException

from . import reasons as R
from .builders import member_names
from .errors import OperatorError
from .models import TrainingJobSpec
from .plugin_jobs import PluginError, Restart, checkpoints, core_api, get_job, jobs_api, restart, resume, suspend

COMMANDS = ("describe", "suspend", "resume", "restart", "checkpoints", "logs")


# -- describe ------------------------------------------------------------------------------------------------
def describe(namespace: str, name: str, output: str | None = None) -> int:
    """The job's state, its per-attempt history, its ranks, its overrides and its timeline of Events."""
    job = get_job(namespace, name)
    timeline = _timeline(namespace, name)
    if output == "json":
        print(json.dumps({"name": name, "namespace": namespace, "spec": job["spec"], "status": job.get("status") or {},
                          "events": [{"time": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "type": e.type,
                                      "reason": e.reason, "message": e.message} for stamp, e in timeline]},
                         indent=2))
        return 0
    spec, st = job["spec"], job.get("status") or {}
    for key, value in _summary(namespace, name, spec, st):
        print(f"{key + ':':<17}{value}")
    print("Conditions:")
    for c in st.get("conditions", []):
        print(f"  {c['type']:<14} {c['status']:<6} {c['reason']:<24} {c.get('message', '')}")
    _print_attempts(st.get("attempts") or [])
    _print_ranks(spec, st)
    if st.get("overrides"):
        print("Overrides:")
        for record in st["overrides"]:
            print(f"  {record['time']}  kubectl ckpt {record['command']:<8} (from attempt "
                  f"{record.get('attempt', '-')}): {json.dumps(record['changes'])[:200]}")
    print("Timeline:")
    for stamp, e in timeline:
        print(f"  {stamp:%H:%M:%S}  {e.type:<7} {e.reason:<24} {e.message}")
    return 0


def _timeline(namespace: str, name: str) -> list[tuple[Any, Any]]:
    """The job's Events, oldest first: (time, event)."""
    events = core_api().list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items

    def when(event: Any) -> Any:
        return event.last_timestamp or event.event_time or event.metadata.creation_timestamp

    ordered = sorted(events, key=lambda event: (when(event), int(event.metadata.resource_version or 0)))
    return [(when(event), event) for event in ordered]


def _summary(namespace: str, name: str, spec: dict[str, Any], st: dict[str, Any]) -> list[tuple[str, Any]]:
    ckpt = spec["checkpoint"]
    storage = (f"pvc/{ckpt['persistentVolumeClaim']['claimName']}" if "persistentVolumeClaim" in ckpt
               else f"nfs {ckpt['nfs']['server']}:{ckpt['nfs']['path']}")
    last = st.get("lastCheckpoint") or {}
    rows: list[tuple[str, Any]] = [
        ("Name", f"{namespace}/{name}"), ("Phase", st.get("phase", "-")), ("Attempt", st.get("attempt", 0)),
        ("Preemptions", f"{st.get('preemptions', 0)} (limit {spec['preemption'].get('maxPreemptions', 'none')})"),
        ("Failures", f"{st.get('failures', 0)} (backoffLimit {spec.get('backoffLimit')})"),
        ("Last checkpoint", f"step {last.get('step')} at {last.get('time')}" if last else "none yet"),
        ("Storage", f"{storage} mounted at {ckpt['mountPath']}, keep {ckpt['keep']}"),
        ("Grace period", f"{spec['preemption']['gracePeriodSeconds']}s"), ("Suspended", spec.get("suspend", False)),
    ]
    if st.get("message"):
        rows.append(("Message", st["message"]))
    rows += _progress_rows(st)
    if st.get("attemptsProgressUnknown"):
        rows.append(("Unreported", f"progress unknown for the last {st['attemptsProgressUnknown']} attempt(s) "
                                   "(they ended with no report: a lost node?) until a trainer says where it resumed"))
    notice = st.get("interruption")
    if notice:
        action = "moving the pods" if notice.get("migrating") else f"checkpoint requested, moving at " \
            f"{notice['migrateTime']}"
        rows.append(("Interruption", f"attempt {notice['attempt']}: node {notice['node']} has {notice['taint']} "
                                     f"(seen {notice['seenTime']}, deadline {notice['deadline']}): {action}"))
    fallback = st.get("fallback") or {}
    if fallback.get("active"):
        rows.append(("Fallback", f"in force since {fallback.get('since')} (preemption.fallback.templatePatch)"))
    rows += _kueue_rows(st)
    return rows


def _progress_rows(st: dict[str, Any]) -> list[tuple[str, Any]]:
    """Progress and ETA (from the trainers' reports: known at each attempt's end), and the goodput so far."""
    rows: list[tuple[str, Any]] = []
    progress, goodput = st.get("progress") or {}, st.get("goodput") or {}
    if progress.get("display"):
        pace = f", {progress['stepSeconds']:.3g}s per step" if progress.get("stepSeconds") else ""
        rows.append(("Progress", f"step {progress['display']} (as of the last report{pace})"))
    if progress.get("estimatedCompletionTime"):
        rows.append(("ETA", f"{progress['estimatedCompletionTime']} (at the measured pace)"))
    if goodput:
        rows.append(("Goodput", f"{goodput['display']} of {goodput['wallSeconds']:.0f}s since creation (as of "
                                f"{goodput['asOf']}): useful {goodput['usefulSeconds']:.0f}s, redone "
                                f"{goodput['redoneSeconds']:.0f}s, saving {goodput['savingSeconds']:.0f}s, restarts "
                                f"{goodput['restartSeconds']:.0f}s, queued {goodput['queuedSeconds']:.0f}s"))
    return rows


def _kueue_rows(st: dict[str, Any]) -> list[tuple[str, Any]]:
    """Where a queued job stands in Kueue: its Workload, its ClusterQueue, and why it waits."""
    known = st.get("kueue")
    if not known:
        return []
    admitted: dict[str, Any] = next((c for c in st.get("conditions") or [] if c.get("type") == "Admitted"), {})
    where = f"admitted by ClusterQueue {known['clusterQueue']}" if known.get("clusterQueue") else "not admitted"
    rows: list[tuple[str, Any]] = [("Kueue", f"Workload {known['workload']}, {where}")]
    if admitted.get("status") == "False" and admitted.get("reason") == "Queued":
        rows.append(("Queued", admitted.get("message", "")))
    return rows


def _print_ranks(spec: dict[str, Any], st: dict[str, Any]) -> None:
    if not st.get("workers"):
        return
    workers = spec.get("workers")
    bounds = f" of {workers['min']}-{workers['max']}" if isinstance(workers, dict) else ""
    print(f"Ranks (attempt {st.get('attempt', 0)}, {st.get('worldSize') or workers}{bounds} workers):")
    if (st.get("elastic") or {}).get("message"):
        print(f"  Elastic: {st['elastic']['message']}; resized {st['elastic'].get('resizes', 0)} time(s)")
    print(f"  {'RANK':<5} {'POD':<30} {'NODE':<20} {'STATE':<12} {'EXIT':<5} {'REASON':<24} STOPPED")
    for w in st["workers"]:
        print(f"  {w['rank']:<5} {w['pod']:<30} {w.get('node') or '-':<20} {w['state']:<12} "
              f"{w.get('exitCode', '-')!s:<5} {w.get('reason') or '-':<24} "
              f"{'yes (gang)' if w.get('stopped') else '-'}")


def _print_attempts(attempts: list[dict[str, Any]]) -> None:
    """One row per attempt: where it ran, when, how it ended, what it resumed from and what it redid."""
    if not attempts:
        return
    print("Attempts:")
    print(f"  {'#':<3} {'POD':<24} {'RANKS':>5} {'NODE':<16} {'START':<9} {'END':<9} {'OUTCOME':<10} {'REASON':<24} "
          f"{'FROM':>6} {'CKPT':>6} {'REDONE':>6} {'STEP_S':>7} {'SAVING_S':>8}")
    for row in attempts:
        pods = row.get("pods") or ["-"]
        print(f"  {row['attempt']:<3} {pods[0] + (f' +{len(pods) - 1}' if len(pods) > 1 else ''):<24} "
              f"{_dash(row.get('workers')):>5} {','.join(row.get('nodes') or []) or '-':<16} "
              f"{(row.get('startTime') or '-')[11:19]:<9} "
              f"{(row.get('endTime') or '-')[11:19]:<9} {row.get('result') or 'running':<10} "
              f"{row.get('reason') or '-':<24} {_dash(row.get('startStep')):>6} {_dash(row.get('checkpointStep')):>6} "
              f"{_dash(row.get('stepsRedone')):>6} {_seconds(row.get('stepSeconds')):>7} "
              f"{_seconds(row.get('stallSeconds')):>8}")


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


# -- logs ------------------------------------------------------------------------------------------------------
def logs(namespace: str, name: str, attempt: int | None, rank: int | None) -> int:
    """The trainer's log of one attempt (default: the current one), every rank or one."""
    job = get_job(namespace, name)
    spec = TrainingJobSpec.model_validate(job["spec"])
    st = job.get("status") or {}
    number = attempt if attempt is not None else st.get("attempt", 0)
    row: dict[str, Any] = next((r for r in st.get("attempts") or [] if r.get("attempt") == number), {})
    size = int(row.get("workers") or st.get("worldSize") or spec.worker_range()[1])
    pods = member_names(name, number, size, spec.ranked or size > 1)
    if rank is not None:
        if not 0 <= rank < len(pods):
            raise PluginError(f"{name} has ranks 0..{len(pods) - 1}")
        pods = [pods[rank]]
    container = spec.trainer()["name"]
    missing = 0
    for pod in pods:
        try:
            text = core_api().read_namespaced_pod_log(pod, namespace, container=container)
        except ApiException as exc:
            if exc.status != 404:
                raise
            print(f"error: pod {pod} of attempt {number} is gone: Kubernetes keeps a pod's log only while the pod "
                  f"exists (the operator removes preempted ones; failed ones are kept)", file=sys.stderr)
            missing += 1
            continue
        if len(pods) > 1:
            print(f"==> {pod} <==")
        print(text, end="" if text.endswith("\n") or not text else "\n")
    return 1 if missing == len(pods) else 0


# -- completion ------------------------------------------------------------------------------------------------
def complete(words: list[str]) -> list[str]:
    """kubectl's plugin completion (`kubectl_complete-ckpt`): commands, then TrainingJob names, then flags."""
    namespace: str | None = None
    args: list[str] = []
    for index, word in enumerate(words):
        if index > 0 and words[index - 1] in ("-n", "--namespace"):
            namespace = word
        elif word.startswith("--namespace="):
            namespace = word.partition("=")[2]
        elif not word.startswith("-"):
            args.append(word)
    if len(args) <= 1:
        prefix = args[0] if args else ""
        return [command for command in COMMANDS if command.startswith(prefix)]
    if len(args) == 2:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call]
            names = [item["metadata"]["name"] for item in jobs_api().list_namespaced_custom_object(
                R.GROUP, R.VERSION, _namespace(namespace, None), R.PLURAL)["items"]]
        except Exception:  # completion never fails loudly
            return []
        return [job for job in names if job.startswith(args[1])]
    flags = {"describe": ["--output"], "resume": ["-f", "--set"], "logs": ["--attempt", "--rank"],
             "restart": ["--copy", "--fresh", "--from-step", "-f", "--set"]}
    return flags.get(args[0], [])


def complete_main() -> int:
    for word in complete(sys.argv[1:]):
        print(word)
    print(":4")  # cobra's ShellCompDirectiveNoFileComp: nothing else to offer
    return 0


# -- CLI -------------------------------------------------------------------------------------------------------
def _namespace(namespace: str | None, kubeconfig: str | None) -> str:
    if namespace:
        return namespace
    current = config.list_kube_config_contexts(kubeconfig)[1]  # type: ignore[no-untyped-call]
    return str(current["context"].get("namespace", "default"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("job")
    parser.add_argument("-n", "--namespace", default=None)
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("-o", "--output", choices=["json"], default=None, help="describe: machine-readable")
    parser.add_argument("-f", "--filename", action="append", default=[],
                        help="resume/restart: a spec override file (a JSON merge patch of the spec; repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="resume/restart: set one spec field, e.g. "
                             "template.spec.containers[0].env[0].value=0.01 (repeatable)")
    parser.add_argument("--copy", nargs="?", const="", default=None, metavar="NEW",
                        help="restart: create a new job (NEW, or a generated name) instead; this one is untouched")
    parser.add_argument("--fresh", action="store_true", help="restart: from step 0; the checkpoints are set aside")
    parser.add_argument("--from-step", type=int, default=None,
                        help="restart: from this older checkpoint; the newer ones are set aside, never deleted")
    parser.add_argument("--attempt", type=int, default=None, help="logs: the attempt (default: the current one)")
    parser.add_argument("--rank", type=int, default=None, help="logs: one rank of a multi-node job")
    return parser


COMMAND_RUNNERS: dict[str, Callable[[str, argparse.Namespace], int]] = {
    "describe": lambda namespace, args: describe(namespace, args.job, args.output),
    "suspend": lambda namespace, args: suspend(namespace, args.job),
    "resume": lambda namespace, args: resume(namespace, args.job, args.filename, args.set),
    "restart": lambda namespace, args: restart(Restart(namespace, args.job, args.copy, args.fresh, args.from_step),
                                               args.filename, args.set),
    "logs": lambda namespace, args: logs(namespace, args.job, args.attempt, args.rank),
    "checkpoints": lambda namespace, args: checkpoints(namespace, args.job),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config.load_kube_config(args.kubeconfig)  # type: ignore[no-untyped-call]
    namespace = _namespace(args.namespace, args.kubeconfig)
    try:
        return COMMAND_RUNNERS[args.command](namespace, args)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "")["message"]
        except (ValueError, KeyError):
            message = exc.reason
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
