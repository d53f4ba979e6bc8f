"""The local test kubelet: runs pods bound to its Node as real local processes. Test infrastructure only.

- registers a Node (cpu, memory, pods, nvidia.com/gpu) and keeps its Lease and Ready condition fresh;
- runs each container through podinit (private mount namespace with the pod's volumes bind-mounted,
  PID namespace so the command is PID 1), with the launcher's PATH; the image is ignored;
- reports status like a kubelet: Pending -> Running -> Succeeded/Failed, exit codes, termination messages;
- on deletion: SIGTERM, the pod's grace period, SIGKILL, final status, then removes the pod;
- a pod removed from the API server (force-deleted) has its containers killed, as a real kubelet does;
- each pod gets its own hostname (`spec.hostname`, else its name; a UTS namespace) and its own /etc/hosts; a pod
  with `spec.subdomain` also finds its peers there, as cluster DNS would serve them: `<hostname>.<subdomain>` of
  every pod in the namespace with that subdomain, once the headless Service of that name exists (refreshed every
  second while the pod runs; every pod IP is 127.0.0.1);
- test control through the node annotation `kubelet.ckpt.dev/mode`:
  `shutdown` = graceful node shutdown (DisruptionTarget/TerminationByKubelet; the node annotation
  `kubelet.ckpt.dev/shutdown-grace-seconds` caps every pod's grace period like `shutdownGracePeriod`),
  `lost` = kill every pod without grace and stop reporting until the annotation is removed,
  `partition` = stop heartbeats, status updates and watching while the pod processes keep running (a network
  partition); removing the annotation heals it: the kubelet re-lists, reports, and kills pods deleted meanwhile,
  `reject` = new pods fail admission with `UnexpectedAdmissionError` (as after a device-plugin restart), and the
  node reports no allocatable `nvidia.com/gpu` until the annotation is removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("test-kubelet")
MODE_ANNOTATION = "kubelet.ckpt.dev/mode"
SHUTDOWN_GRACE_ANNOTATION = "kubelet.ckpt.dev/shutdown-grace-seconds"
PODINIT = Path(__file__).with_name("podinit.py")
MAX_MESSAGE = 4096
POD_IP = "127.0.0.1"  # every pod runs on this host's network
CLUSTER_DOMAIN = "cluster.local"
HOSTS_REFRESH_SECONDS = 1.0


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion; $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _service_env() -> dict[str, str]:
    """KUBERNETES_SERVICE_HOST/PORT, as a real kubelet sets them in every container (here: the API server)."""
    from urllib.parse import urlparse

    from kubernetes import client

    url = urlparse(client.Configuration.get_default_copy().host)
    return {"KUBERNETES_SERVICE_HOST": url.hostname or "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(url.port or 443)}


class PodNotReady(Exception):
    """A volume or reference cannot be resolved yet (reported as a waiting reason and retried)."""

    def __init__(self, message: str, reason: str = "ContainerCreating") -> None:
        super().__init__(message)
        self.reason = reason


class PodWorker(threading.Thread):
    """Owns one pod: prepares volumes, runs its containers, reports status, handles termination."""

    def __init__(self, kubelet: Kubelet, pod: Any) -> None:
        super().__init__(name=f"pod-{pod.metadata.name}", daemon=True)
        self.kubelet, self.core = kubelet, kubelet.core
        self.pod = pod
        self.uid = pod.metadata.uid
        self.name, self.namespace = pod.metadata.name, pod.metadata.namespace
        self.dir = kubelet.state_dir / "pods" / self.uid
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.started_at: dict[str, str] = {}
        self.finished_at: dict[str, str] = {}
        self.deleting = threading.Event()
        self.grace = 30.0
        self.lost = False
        self.disruption: dict[str, str] | None = None
        self.lock = threading.Lock()
        self.kill_timer: threading.Timer | None = None
        self.admitted = time.monotonic()  # activeDeadlineSeconds counts from here, like status.startTime
        self.deadline_exceeded = False
        self.kill_at = float("inf")  # time.monotonic() of the SIGKILL that ends the grace period
        self.ended = threading.Event()  # every container has exited
        self.downward: dict[str, Path] = {}  # downward-API volumes by name: rewritten when the pod changes

    # -- lifecycle -----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.namespace, self.name)
        finally:
            self.kubelet.forget(self.uid)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kubelet.pod_dirs[(self.namespace, self.name)] = self.dir
        specs = None
        while specs is None:
            if self.deleting.is_set():
                self._finalize(None)
                return
            try:
                specs = [self._container_spec(c) for c in self.pod.spec.containers]
            except PodNotReady as exc:
                self._patch_status({"phase": "Pending", "containerStatuses": [
                    self._status_entry(c.name, {"waiting": {"reason": exc.reason, "message": str(exc)}})
                    for c in self.pod.spec.containers]})
                self.deleting.wait(2)
        with self.lock:
            if self.deleting.is_set():
                self._finalize(None)
                return
            for spec in specs:
                self._start(spec)
        self._report_running()
        if self.pod.spec.subdomain:
            threading.Thread(target=self._hosts_loop, name=f"hosts-{self.name}", daemon=True).start()
        deadline = self.pod.spec.active_deadline_seconds
        if deadline:
            timer = threading.Timer(max(0.0, self.admitted + deadline - time.monotonic()), self._deadline)
            timer.daemon = True
            timer.start()
        codes: dict[str, int] = {}
        while len(codes) < len(self.procs):  # each container's end is reported as it happens
            for name, proc in self.procs.items():
                if name not in codes and proc.poll() is not None:
                    codes[name] = proc.returncode  # PID 1 gone: the kernel has killed the rest of its namespace
                    self.finished_at[name] = now()
                    if len(codes) < len(self.procs) and not self.lost:
                        self._report_running(codes)
            time.sleep(0.1)
        self.ended.set()
        if self.lost:
            return  # a lost node reports nothing
        self._finalize(codes)

    def terminate(self, grace: float, reason: dict[str, str] | None = None) -> None:
        """SIGTERM every container, SIGKILL after `grace` seconds. A second call can only shorten the grace
        period (like a second `kubectl delete --grace-period` with a smaller value on a real kubelet)."""
        with self.lock:
            if reason:
                self.disruption = reason
            kill_at = time.monotonic() + grace
            if self.deleting.is_set():
                if kill_at >= self.kill_at:
                    return
                log.info("pod %s/%s: grace period shortened to %.0fs", self.namespace, self.name, grace)
            else:
                self.grace = grace
                self.deleting.set()
                log.info("pod %s/%s: terminating, grace period %.0fs", self.namespace, self.name, grace)
                for name in self.procs:
                    self._signal(name, signal.SIGTERM)
            if self.kill_timer is not None:
                self.kill_timer.cancel()
            self.kill_at = kill_at
            self.kill_timer = threading.Timer(grace, self._kill_all)
            self.kill_timer.daemon = True
            self.kill_timer.start()

    def _deadline(self) -> None:
        """activeDeadlineSeconds passed: SIGTERM with the grace period, then Failed/DeadlineExceeded (kept)."""
        if self.deleting.is_set():
            return
        self.deadline_exceeded = True
        log.info("pod %s/%s: activeDeadlineSeconds exceeded", self.namespace, self.name)
        self.terminate(float(self.pod.spec.termination_grace_period_seconds or 30))

    def kill_lost(self) -> None:
        """Node lost: kill without grace and report nothing."""
        self.lost = True
        self.deleting.set()
        self._kill_all()

    def _kill_all(self) -> None:
        for name in list(self.procs):
            self._signal(name, signal.SIGKILL)

    def _signal(self, name: str, sig: int) -> None:
        if self.procs[name].poll() is not None:
            return  # podinit exited after reaping the container: its pid may already belong to someone else
        pid = self._pid(name)
        log.info("pod %s/%s: signal %s to container %s (pid %s)", self.namespace, self.name, sig, name, pid)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _pid(self, name: str) -> int | None:
        if name in self.pids:
            return self.pids[name]
        pidfile = self.dir / name / "pid"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.procs[name].poll() is None:
            if pidfile.exists():
                self.pids[name] = int(pidfile.read_text())
                return self.pids[name]
            time.sleep(0.02)
        return None

    # -- containers ----------------------------------------------------------------------------------
    def _container_spec(self, c: Any) -> dict[str, Any]:
        if self.pod.spec.init_containers:
            raise PodNotReady("initContainers are not supported by the local test kubelet")
        if not c.command:
            raise PodNotReady(f"container {c.name}: the local test kubelet needs `command` (images are ignored)")
        volumes = {v.name: v for v in self.pod.spec.volumes or []}
        mounts = []
        for vm in c.volume_mounts or []:
            if vm.name not in volumes:
                raise PodNotReady(f"volume {vm.name} is not defined")
            source = self._volume_dir(volumes[vm.name])
            if vm.sub_path:
                source = source / vm.sub_path
                source.mkdir(parents=True, exist_ok=True)
            mounts.append({"source": str(source), "target": vm.mount_path, "readOnly": bool(vm.read_only)})
        cdir = self.dir / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term = cdir / "termination-log"
        term.write_text("")
        mounts.append({"source": str(term), "target": c.termination_message_path or "/dev/termination-log"})
        self._write_hosts()
        mounts.append({"source": str(self.hosts_file), "target": "/etc/hosts"})
        env = self._env(c)
        argv = [_expand(a, env) for a in list(c.command) + list(c.args or [])]
        return {"name": c.name, "argv": argv, "env": env, "workingDir": c.working_dir, "mounts": mounts,
                "pidfile": str(cdir / "pid"), "dir": str(cdir), "hostname": self.hostname}

    # -- hostname and DNS ----------------------------------------------------------------------------
    @property
    def hostname(self) -> str:
        return str(self.pod.spec.hostname or self.name)[:63]

    @property
    def hosts_file(self) -> Path:
        return self.dir / "etc-hosts"

    def _peers(self) -> list[str]:
        """`<hostname>.<subdomain>` of every pod cluster DNS would answer for: same namespace and subdomain, a
        Service named like the subdomain, the pod started (has an IP: publishNotReadyAddresses)."""
        subdomain = self.pod.spec.subdomain
        if not subdomain:
            return []
        try:
            self.core.read_namespaced_service(subdomain, self.namespace)
            pods = self.core.list_namespaced_pod(self.namespace).items
        except ApiException:
            return []
        return sorted(f"{p.spec.hostname}.{subdomain}" for p in pods
                      if p.spec.subdomain == subdomain and p.spec.hostname and p.status and p.status.pod_ip)

    def _write_hosts(self) -> None:
        """The pod's /etc/hosts: its own name (as the kubelet writes it) and the peers DNS would resolve. Rewritten
        in place (the containers see it through a bind mount) and only when it changes."""
        own = [self.hostname]
        if self.pod.spec.subdomain:
            own.insert(0, f"{self.hostname}.{self.pod.spec.subdomain}.{self.namespace}.svc.{CLUSTER_DOMAIN}")
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 "# Kubernetes-managed hosts file (local test kubelet)", f"{POD_IP}\t{' '.join(own)}"]
        for peer in self._peers():
            lines.append(f"{POD_IP}\t{peer}.{self.namespace}.svc.{CLUSTER_DOMAIN} {peer}.{self.namespace}.svc {peer}")
        text = "\n".join(lines) + "\n"
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.hosts_file.exists() or self.hosts_file.read_text() != text:
            with open(self.hosts_file, "w") as f:  # in place: the bind mount keeps this inode
                f.write(text)

    def _hosts_loop(self) -> None:
        while not self.deleting.wait(HOSTS_REFRESH_SECONDS) and not self.ended.is_set():
            try:
                self._write_hosts()
            except Exception as exc:  # the API server restarting: try again next second
                log.debug("pod %s/%s: hosts refresh failed: %s", self.namespace, self.name, exc)

    def _volume_dir(self, volume: Any) -> Path:
        base = self.kubelet.state_dir
        if volume.persistent_volume_claim:
            claim = volume.persistent_volume_claim.claim_name
            try:
                pvc = self.core.read_namespaced_persistent_volume_claim(claim, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    raise PodNotReady(f'persistentvolumeclaim "{claim}" not found') from None
                raise
            if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
                raise PodNotReady(f'persistentvolumeclaim "{claim}" is not bound')
            pv = self.core.read_persistent_volume(pvc.spec.volume_name)
            source = pv.spec.host_path.path if pv.spec.host_path else (pv.spec.local.path if pv.spec.local else None)
            path = Path(source) if source else base / "pv" / pv.metadata.name
        elif volume.nfs:
            path = base / "nfs" / volume.nfs.server / volume.nfs.path.strip("/")
        elif volume.host_path:
            path = Path(volume.host_path.path)
        else:  # emptyDir, configMap, secret, projected, ...: a per-pod directory
            path = self.dir / "volumes" / volume.name
            if volume.downward_api:
                self.downward[volume.name] = path
                self._write_downward_api(path, volume)
            if volume.config_map:
                path.mkdir(parents=True, exist_ok=True)
                cm = self.core.read_namespaced_config_map(volume.config_map.name, self.namespace)
                for key, value in (cm.data or {}).items():
                    (path / key).write_text(value)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _env(self, c: Any) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
               "HOSTNAME": self.hostname, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"),
               **_service_env()}
        for e in c.env or []:
            if e.value_from is None:
                env[e.name] = _expand(e.value or "", env)
                continue
            ref = e.value_from
            try:
                if ref.field_ref:
                    env[e.name] = self._field(ref.field_ref.field_path)
                elif ref.config_map_key_ref:
                    cm = self.core.read_namespaced_config_map(ref.config_map_key_ref.name, self.namespace)
                    env[e.name] = (cm.data or {}).get(ref.config_map_key_ref.key, "")
                elif ref.secret_key_ref:
                    import base64

                    secret = self.core.read_namespaced_secret(ref.secret_key_ref.name, self.namespace)
                    env[e.name] = base64.b64decode((secret.data or {}).get(ref.secret_key_ref.key, "")).decode()
            except ApiException as exc:
                if exc.status != 404:
                    raise
                kind = "configmap" if ref.config_map_key_ref else "secret"
                name = (ref.config_map_key_ref or ref.secret_key_ref).name
                raise PodNotReady(f'{kind} "{name}" not found', "CreateContainerConfigError") from None
        return env

    # -- downward API volumes ------------------------------------------------------------------------
    def update(self, pod: Any) -> None:
        """A newer copy of the pod from the watch: like the kubelet (a pod update makes it sync the pod, and each
        sync sets up the downward-API volumes again), rewrite them at once; the real one takes a few 100 ms."""
        self.pod = pod
        volumes = {v.name: v for v in pod.spec.volumes or []}
        for name, path in list(self.downward.items()):
            if name in volumes:
                try:
                    self._write_downward_api(path, volumes[name])
                except OSError as exc:
                    log.warning("pod %s/%s: downward API volume %s: %s", self.namespace, self.name, name, exc)

    def _write_downward_api(self, path: Path, volume: Any) -> None:
        """Write the files as the kubelet's AtomicWriter does: in a new timestamped directory that the `..data`
        link is switched to by one rename, each file a link through `..data`: a reader never sees half a file."""
        files = {item.path: self._field_file(item.field_ref.field_path)
                 for item in volume.downward_api.items or [] if item.field_ref}
        data = path / "..data"
        if data.is_dir() and all((data / name).is_file() and (data / name).read_text() == text
                                 for name, text in files.items()):
            return
        path.mkdir(parents=True, exist_ok=True)
        fresh = path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        fresh.mkdir()
        for name, text in files.items():
            (fresh / name).write_text(text)
        link = path / "..data_tmp"
        os.symlink(fresh.name, link)
        old = os.readlink(data) if data.is_symlink() else None
        os.rename(link, data)
        for name in files:
            if not (path / name).is_symlink():
                os.symlink(f"..data/{name}", path / name)
        if old is not None:
            shutil.rmtree(path / old, ignore_errors=True)

    def _field_file(self, path: str) -> str:
        """A downward-API file's content; maps as the kubelet writes them: sorted `key="value"` lines."""
        if path in ("metadata.annotations", "metadata.labels"):
            values = getattr(self.pod.metadata, path.split(".")[1]) or {}
            return "\n".join(f"{key}={json.dumps(value)}" for key, value in sorted(values.items()))
        return self._field(path)

    def _field(self, path: str) -> str:
        meta = self.pod.metadata
        simple = {"metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid,
                  "spec.nodeName": self.pod.spec.node_name, "spec.serviceAccountName":
                  self.pod.spec.service_account_name, "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        if path in simple:
            return str(simple[path] or "")
        m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
        if m:
            return str((getattr(meta, m.group(1)) or {}).get(m.group(2), ""))
        return ""

    def _start(self, spec: dict[str, Any]) -> None:
        cdir = Path(spec["dir"])
        (cdir / "spec.json").write_text(json.dumps(spec))
        logf = open(cdir / "log", "ab")  # noqa: SIM115
        self.procs[spec["name"]] = subprocess.Popen(
            [sys.executable, str(PODINIT), str(cdir / "spec.json")], stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        self.started_at[spec["name"]] = now()
        log.info("pod %s/%s: started container %s: %s", self.namespace, self.name, spec["name"], spec["argv"])

    # -- status --------------------------------------------------------------------------------------
    def _status_entry(self, name: str, state: dict[str, Any], restarts: int = 0) -> dict[str, Any]:
        container = next(c for c in self.pod.spec.containers if c.name == name)
        return {"name": name, "image": container.image or "local", "imageID": "", "restartCount": restarts,
                "ready": "running" in state, "started": "running" in state, "state": state,
                "containerID": f"local://{self.uid}/{name}"}

    def _conditions(self, ready: bool) -> list[dict[str, Any]]:
        status = "True" if ready else "False"
        conds = [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in
                 (("Initialized", "True"), ("ContainersReady", status), ("Ready", status))]
        if self.disruption:
            conds.append({"type": "DisruptionTarget", "status": "True", "lastTransitionTime": now(),
                          **self.disruption})
        return conds

    def _report_running(self, ended: dict[str, int] | None = None) -> None:
        """Phase Running; containers in `ended` (name -> exit code) are reported terminated already."""
        ended = ended or {}
        self._patch_status({
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.started_at[next(iter(self.procs))], "conditions": self._conditions(not ended),
            "containerStatuses": [self._status_entry(n, self._terminated(n, ended[n]) if n in ended else
                                                     {"running": {"startedAt": self.started_at[n]}})
                                  for n in self.procs]})

    def _terminated(self, name: str, code: int) -> dict[str, Any]:
        return {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                               "message": self._message(name, code), "startedAt": self.started_at[name],
                               "finishedAt": self.finished_at.get(name) or now(),
                               "containerID": f"local://{self.uid}/{name}"}}

    def _finalize(self, codes: dict[str, int] | None) -> None:
        if codes is not None:
            statuses = [self._status_entry(name, self._terminated(name, code)) for name, code in codes.items()]
            phase = "Succeeded" if all(c == 0 for c in codes.values()) else "Failed"
            status: dict[str, Any] = {"phase": phase, "conditions": self._conditions(False),
                                      "containerStatuses": statuses}
            if self.disruption and self.disruption.get("reason") == "TerminationByKubelet":
                status.update(phase="Failed", reason="Terminated",
                              message="Pod was terminated in response to imminent node shutdown.")
            if self.deadline_exceeded:
                status.update(phase="Failed", reason="DeadlineExceeded",
                              message="Pod was active on the node longer than the specified deadline")
            self._patch_status(status)
            log.info("pod %s/%s: %s %s", self.namespace, self.name, phase, codes)
        self.kubelet.connected.wait()
        if (self.deleting.is_set() and self.disruption is None and not self.deadline_exceeded) \
                or self._has_deletion_timestamp():
            try:
                self.core.delete_namespaced_pod(self.name, self.namespace, grace_period_seconds=0,
                                                body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                            preconditions={"uid": self.uid}))
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise

    def _has_deletion_timestamp(self) -> bool:
        try:
            return self.core.read_namespaced_pod(self.name, self.namespace).metadata.deletion_timestamp is not None
        except ApiException:
            return False

    def _message(self, name: str, code: int) -> str:
        container = next(c for c in self.pod.spec.containers if c.name == name)
        path = self.dir / name / "termination-log"
        message = path.read_bytes()[:MAX_MESSAGE].decode(errors="replace") if path.exists() else ""
        if not message and code != 0 and container.termination_message_policy == "FallbackToLogsOnError":
            logs = (self.dir / name / "log").read_bytes()[-2048:].decode(errors="replace")
            message = "\n".join(logs.splitlines()[-80:])
        return message

    def _patch_status(self, status: dict[str, Any]) -> None:
        self.kubelet.connected.wait()  # a partitioned node reports nothing until it heals
        try:  # the uid is a precondition (as the kubelet's status manager patches): a pod deleted and created
            # again under the same name is another pod, and never gets this one's status
            self.core.patch_namespaced_pod_status(self.name, self.namespace,
                                                  {"metadata": {"uid": self.uid}, "status": status})
        except ApiException as exc:
            another = exc.status == 422 and "metadata.uid" in str(exc.body)  # "field is immutable": another pod now
            if exc.status not in (404, 409) and not another:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc.reason)


class Kubelet:
    """Registers the node, watches its pods and runs one PodWorker per pod."""

    def __init__(self, node_name: str, state_dir: Path, capacity: dict[str, str]) -> None:
        self.node_name, self.state_dir, self.capacity = node_name, state_dir, capacity
        self.posted_mode = ""  # the mode the last status post reported (see _post_status)
        self.core = client.CoreV1Api()
        self.coordination = client.CoordinationV1Api()
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.mode = ""
        self.connected = threading.Event()  # cleared while the node is partitioned from the API server
        self.connected.set()
        self.relist = threading.Event()  # set when a partition heals: re-list pods as a real kubelet does
        self.pod_dirs: dict[tuple[str, str], Path] = {}  # (namespace, pod name) -> its state directory: logs
        self.server_port = 0  # the kubelet API (container logs), as daemonEndpoints.kubeletEndpoint

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    # -- the kubelet API: container logs, as `kubectl logs` reaches them through the API server ---------------
    def serve(self) -> None:
        """HTTPS on a free port (a self-signed certificate: the API server does not verify a kubelet's serving
        certificate unless told to), answering /containerLogs/<namespace>/<pod>/<container>."""
        import http.server
        import ssl
        from urllib.parse import parse_qs, urlparse

        cert, key = self.state_dir / "kubelet.crt", self.state_dir / "kubelet.key"
        if not cert.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                            str(cert), "-days", "3650", "-subj", f"/CN={self.node_name}", "-addext",
                            "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        kubelet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                _, namespace, pod, container = parts
                directory = kubelet.pod_dirs.get((namespace, pod))
                path = directory / container / "log" if directory is not None else None
                if path is None or not path.exists():
                    self.send_error(404, f"no log of container {container} of pod {namespace}/{pod} here")
                    return
                text = path.read_bytes()
                query = parse_qs(url.query)
                if "tailLines" in query:
                    lines = text.splitlines(keepends=True)
                    text = b"".join(lines[-int(query["tailLines"][0]):]) if int(query["tailLines"][0]) else b""
                if "limitBytes" in query:
                    text = text[:int(query["limitBytes"][0])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.server_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()

    # -- node ----------------------------------------------------------------------------------------
    def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "ckpt.dev/test-kubelet": "true"}
        body = {"metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._post_status()

    def _post_status(self) -> None:
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local test kubelet is ready",
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()}
        # `reject`: the device plugin is unhealthy, so no GPU is allocatable (a real kubelet does the same; pods bound
        # before the scheduler saw it fail admission)
        allocatable = {**self.capacity, "nvidia.com/gpu": "0"} if self.mode == "reject" else self.capacity
        self.posted_mode = self.mode
        status = {"capacity": self.capacity, "allocatable": allocatable, "conditions": [ready],
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": self.node_name}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": self.server_port}},
                  "nodeInfo": {"kubeletVersion": "v1.35.4-local", "operatingSystem": "linux", "architecture": "amd64",
                               "containerRuntimeVersion": "local://podinit", "kernelVersion": os.uname().release,
                               "osImage": "local", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                               "bootID": ""}}
        self.core.patch_node_status(self.node_name, {"status": status})

    def _renew_lease(self) -> None:
        body = {"metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                         "renewTime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            self.coordination.patch_namespaced_lease(self.node_name, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def _refresh_mode(self) -> None:
        try:
            node = self.core.read_node(self.node_name)
        except ApiException:
            return
        mode = (node.metadata.annotations or {}).get(MODE_ANNOTATION, "")
        if {mode, self.mode} <= {"reject", ""}:  # the other modes act on running pods: the heartbeat loop
            self.mode = mode

    def heartbeat_loop(self) -> None:
        last_status = 0.0
        while not self.stopping.wait(1.0):
            try:
                node = self.core.read_node(self.node_name)
                mode = (node.metadata.annotations or {}).get(MODE_ANNOTATION, "")
                if mode != self.mode:
                    self._change_mode(mode)
                if self.mode in ("lost", "partition"):
                    continue
                self._renew_lease()
                if time.monotonic() - last_status > 5 or self.posted_mode != self.mode:
                    self._post_status()
                    last_status = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    def _change_mode(self, mode: str) -> None:
        log.info("node %s: test mode %r -> %r", self.node_name, self.mode, mode)
        self.mode = mode
        with self.lock:
            workers = list(self.workers.values())
        if mode == "shutdown":
            node = self.core.read_node(self.node_name)
            cap = (node.metadata.annotations or {}).get(SHUTDOWN_GRACE_ANNOTATION)
            for w in workers:
                grace = float(w.pod.spec.termination_grace_period_seconds or 30)
                if cap is not None:
                    grace = min(grace, float(cap))  # the node's shutdownGracePeriod caps every pod's
                w.terminate(grace, {"reason": "TerminationByKubelet",
                                    "message": "Pod was terminated in response to imminent node shutdown."})
            for w in workers:
                w.join(timeout=120)
            self.core.patch_node(self.node_name, {"metadata": {"annotations": {MODE_ANNOTATION: None}}})
            self.mode = ""  # the shutdown is over: a test may start the next one at once
        elif mode == "lost":
            for w in workers:
                w.kill_lost()
        if mode == "partition":
            self.connected.clear()
        elif not self.connected.is_set():
            self.connected.set()
            self.relist.set()

    # -- pods ----------------------------------------------------------------------------------------
    def handle(self, pod: Any) -> None:
        uid = pod.metadata.uid
        if not self.connected.is_set():
            return  # partitioned: this event never reached the node; the re-list after healing brings it
        if uid not in self.workers and pod.metadata.deletion_timestamp is None:
            self._refresh_mode()  # a test may have set the mode just before creating the pod
        with self.lock:
            worker = self.workers.get(uid)
            terminal = pod.status.phase in ("Succeeded", "Failed")
            if worker is None and self.mode == "lost":
                return
            if worker is None and not terminal and pod.metadata.deletion_timestamp is None \
                    and self.mode == "reject":
                self._reject(pod)
                return
            if worker is None and pod.metadata.deletion_timestamp is not None:
                if pod.metadata.deletion_grace_period_seconds == 0:
                    return  # already confirmed; only finalizers hold it
                if terminal or pod.status.phase == "Pending" or not pod.status.phase:
                    self._force_delete(pod)
                return
            if worker is None and not terminal:
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
                return
        if worker is not None and pod.metadata.deletion_timestamp is not None:
            worker.pod = pod
            worker.terminate(float(pod.metadata.deletion_grace_period_seconds or 0))
        elif worker is not None:
            worker.update(pod)

    def _reject(self, pod: Any) -> None:
        """Admission failure, as after a device-plugin restart: the pod fails before any container starts."""
        status = {"phase": "Failed", "reason": "UnexpectedAdmissionError",
                  "message": "Pod was rejected: Allocate failed due to no healthy devices present; cannot allocate "
                             "unhealthy devices nvidia.com/gpu, which is unexpected"}
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as exc:
            log.warning("reject %s failed: %s", pod.metadata.name, exc.reason)

    def removed(self, uid: str) -> None:
        """The pod is gone from the API (force-deleted): stop its containers, as a real kubelet does."""
        with self.lock:
            worker = self.workers.get(uid)
        if worker is not None and not worker.deleting.is_set():
            log.info("pod %s/%s: removed from the API server; killing it", worker.namespace, worker.name)
            worker.terminate(2.0)

    def _force_delete(self, pod: Any) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                                            body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                        preconditions={"uid": pod.metadata.uid}))
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("delete %s failed: %s", pod.metadata.name, exc.reason)

    def watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                self.connected.wait()
                self.relist.clear()
                pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for pod in pods.items:
                    self.handle(pod)
                listed = {pod.metadata.uid for pod in pods.items}
                with self.lock:
                    gone = [uid for uid in self.workers if uid not in listed]
                for uid in gone:
                    self.removed(uid)
                w = watch.Watch()
                for event in w.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                      resource_version=pods.metadata.resource_version, timeout_seconds=5):
                    if self.stopping.is_set() or self.relist.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(event["object"])
                    elif event["type"] == "DELETED" and self.connected.is_set():
                        self.removed(event["object"].metadata.uid)
            except Exception as exc:
                if not self.stopping.is_set():
                    log.warning("pod watch restarting: %s", exc)
                    time.sleep(1)

    def shutdown(self) -> None:
        """Kubelet stopping (cluster-down): terminate every pod with its grace period."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.terminate(min(float(w.pod.spec.termination_grace_period_seconds or 30), 10.0))
        for w in workers:
            w.join(timeout=15)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", default="local-node")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="32Gi")
    p.add_argument("--gpus", default="4")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config.load_kube_config(args.kubeconfig)
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    kubelet = Kubelet(args.node_name, state_dir, {"cpu": args.cpu, "memory": args.memory, "pods": "110",
                                                   "nvidia.com/gpu": args.gpus, "ephemeral-storage": "100Gi"})
    kubelet.serve()
    kubelet.register()
    kubelet._renew_lease()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=kubelet.heartbeat_loop, daemon=True).start()
    threading.Thread(target=kubelet.watch_loop, daemon=True).start()
    log.info("local test kubelet for node %s is running (state in %s)", args.node_name, state_dir)
    stop.wait()
    kubelet.shutdown()
    shutil.rmtree(state_dir / "pods", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
