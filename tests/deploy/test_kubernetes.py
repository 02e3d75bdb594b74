"""deploy/kubernetes: every manifest validated against the Kubernetes API schema without a cluster
(kubernetes-validate, strict: an unknown field fails), the properties the service needs asserted on the
parsed YAML, and the real server started the way the Deployment runs it: a read-only root file system with
only the Deployment's emptyDir paths writable."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.config import available_cpus, load
from tests.conftest import ROOT, http, post_json, start_server, wait_for
from tests.support.redis_server import RedisServer, need_redis_server

K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
# The oldest Kubernetes the manifests claim to support (README.md) and the newest schema the pinned
# kubernetes-validate ships: a field that only exists in newer versions fails the first.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
IMAGE_UID = 10001  # USER 10001:10001 in the Dockerfile
SERVER = "procbridge"  # the Deployment, its Service, HPA and container are all named so


# -- reading the manifests --------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != KUSTOMIZATION)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in documents(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name} in {K8S}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return resource("Deployment", SERVER)


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == [SERVER]
    c: dict[str, Any] = containers[0]
    return c


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number or the name of a container port) as a number."""
    ports = {p.get("name"): p["containerPort"] for p in container()["ports"]}
    number = ports.get(port, port) if isinstance(port, str) else port
    assert number in ports.values(), f"port {port!r} is not one of the container's ports {ports}"
    return int(number)


def server_env() -> dict[str, str]:
    """The container's environment as the pod gets it: literal values, and secretKeyRef values read
    from the Secret manifests (nothing else may be referenced)."""
    env: dict[str, str] = {}
    for item in container().get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = resource("Secret", ref["name"])
        env[item["name"]] = secret["stringData"][ref["key"]]
    return env


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("2", "500m", "1Gi") as a number."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert m is not None and (m.group(2) == "" or m.group(2) in _SUFFIXES), f"not a quantity: {value!r}"
    return float(m.group(1)) * _SUFFIXES.get(m.group(2), 1)


def volume_of(mount_path: str) -> dict[str, Any]:
    mounts = {m["mountPath"]: m for m in container().get("volumeMounts", [])}
    assert mount_path in mounts, f"nothing is mounted at {mount_path}; mounts: {sorted(mounts)}"
    assert not mounts[mount_path].get("readOnly", False), f"{mount_path} is mounted read-only"
    volumes = {v["name"]: v for v in pod_spec().get("volumes", [])}
    volume: dict[str, Any] = volumes[mounts[mount_path]["name"]]
    return volume


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (a Service's plain map, or matchLabels/matchExpressions) against pod labels."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        inside = labels.get(expr["key"]) in expr.get("values", [])
        ok = {"In": present and inside, "NotIn": not inside, "Exists": present, "DoesNotExist": not present}
        if not ok[expr["operator"]]:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))  # an empty one selects all


def pod_templates() -> dict[str, dict[str, str]]:
    """'Kind/name' -> pod labels, for every workload in the manifests."""
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["metadata"]["labels"]
            for d in all_resources() if d["kind"] in ("Deployment", "StatefulSet")}


# -- the manifests are valid Kubernetes objects ----------------------------------------------------


def test_kustomization_lists_every_manifest_file_and_nothing_else() -> None:
    kustomization = yaml.safe_load((K8S / KUSTOMIZATION).read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"a resource is listed twice: {listed}"
    assert sorted(listed) == [p.name for p in manifest_files()]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schema_in_strict_mode(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not a valid Kubernetes "
                        f"{exc.version} object: {where}: {exc.message}")


def test_strict_validation_rejects_a_misspelt_field_that_lax_validation_lets_through() -> None:
    """Proves the validator runs in strict mode: a typo (a capital S in readOnlyRootFilesystem, which the
    API server would silently drop, leaving the root file system writable) fails."""
    broken = copy.deepcopy(deployment())
    context = broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    version = KUBERNETES_VERSIONS[-1]
    kubernetes_validate.validate(broken, version, strict=False)  # the lax schema allows unknown fields
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(broken, version, strict=True)


def test_validation_rejects_a_wrongly_typed_and_a_missing_required_field() -> None:
    version = KUBERNETES_VERSIONS[-1]
    wrong_type = copy.deepcopy(deployment())
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, version, strict=True)
    missing = copy.deepcopy(resource("HorizontalPodAutoscaler", SERVER))
    del missing["spec"]["maxReplicas"]
    with pytest.raises(kubernetes_validate.ValidationError, match="maxReplicas"):
        kubernetes_validate.validate(missing, version, strict=True)


# -- the Deployment runs the service as it needs --------------------------------------------------


def test_deployment_environment_is_accepted_by_the_service_config_loader() -> None:
    """The env (Secret values resolved) goes through service.config.load, as the server would read it;
    it serves on all interfaces on the container port and uses a shared Redis store."""
    config = load([], env=server_env())
    assert config.host == "0.0.0.0"
    assert config.port == container_port("http")
    assert config.store.startswith(("redis://", "rediss://")), (
        f"PROCBRIDGE_STORE={config.store!r}: replicas (and the HPA) need a shared Redis store; a SQLite file "
        "on a pod is per pod and its jobs go with the pod"
    )


def test_liveness_probe_gets_healthz_and_readiness_probe_gets_readyz_on_the_container_port() -> None:
    live = container()["livenessProbe"]["httpGet"]
    ready = container()["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert ready["path"] == "/readyz"
    port = load([], env=server_env()).port
    assert container_port(live["port"]) == port
    assert container_port(ready["port"]) == port


def test_termination_grace_period_outlasts_the_prestop_wait_plus_the_shutdown_grace() -> None:
    """Kubernetes counts the preStop hook inside terminationGracePeriodSeconds, then SIGKILLs: the pod
    must get the preStop wait, then PROCBRIDGE_SHUTDOWN_GRACE for calls in flight, then time to stop
    its workers. The preStop wait exists because endpoint removal and SIGTERM race: without it, requests
    routed to the pod in the first seconds of its drain get 503 `draining`."""
    grace = load([], env=server_env()).shutdown_grace
    assert "PROCBRIDGE_SHUTDOWN_GRACE" in server_env(), "the grace must be explicit where its bound is set"
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("/bin/sleep", "sleep") and len(command) == 2, command
    pre_stop = float(command[1])
    assert 0 < pre_stop <= 10
    assert pod_spec()["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


def test_dev_shm_is_a_size_limited_memory_emptydir_that_holds_the_shm_budget() -> None:
    """/dev/shm carries large bodies; a container runtime's default is 64 MB. The service's budget must
    fit in sizeLimit (past it the kubelet evicts the pod), and the memory limit must cover it (a memory
    emptyDir is charged to the pod's memory)."""
    volume = volume_of("/dev/shm")
    assert volume["emptyDir"]["medium"] == "Memory"
    size = quantity(volume["emptyDir"]["sizeLimit"])
    assert size >= 2**30, "64 MiB bodies in and out, several at once, need about 1 GiB (compose: shm_size 1gb)"
    budget = load([], env=server_env()).shm_budget
    assert budget is not None and 0 < budget <= size, f"PROCBRIDGE_SHM_BUDGET {budget} vs sizeLimit {size}"
    assert quantity(container()["resources"]["limits"]["memory"]) > size


def test_cpu_limit_is_a_whole_number_of_cores_equal_to_the_request_and_the_worker_count_follows_it() -> None:
    """The service starts one worker per CPU of its cgroup quota (cpu.max, rounded up), which the kubelet
    writes from limits.cpu: a whole number gives exactly that many unthrottled workers. PROCBRIDGE_WORKERS
    stays unset so that the limit alone decides. requests = limits gives Guaranteed QoS."""
    resources = container()["resources"]
    cpu = quantity(resources["limits"]["cpu"])
    assert cpu >= 1 and cpu == int(cpu), f"limits.cpu {resources['limits']['cpu']!r} is not a whole number"
    assert quantity(resources["requests"]["cpu"]) == cpu
    assert quantity(resources["requests"]["memory"]) == quantity(resources["limits"]["memory"])
    assert "PROCBRIDGE_WORKERS" not in server_env()


def test_a_cgroup_quota_written_from_the_cpu_limit_gives_that_many_workers_on_a_big_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kubelet does with limits.cpu (cgroup v2: cpu.max = "<cores x 100000> 100000"), fed to the
    service's own CPU count on a 64-core node."""
    cores = quantity(container()["resources"]["limits"]["cpu"])
    cgroup = tmp_path / "cgroup" / "kubepods" / "pod1" / "ctr"
    cgroup.mkdir(parents=True)
    (cgroup / "cpu.max").write_text(f"{int(cores * 100_000)} 100000\n")
    (tmp_path / "proc_self_cgroup").write_text("0::/kubepods/pod1/ctr\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert available_cpus(tmp_path / "cgroup", str(tmp_path / "proc_self_cgroup")) == int(cores)


def test_pod_runs_as_the_image_user_non_root_read_only_without_privileges() -> None:
    pod = pod_spec().get("securityContext", {})
    ctx = {**pod, **container().get("securityContext", {})}  # the container's settings win
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser") == IMAGE_UID
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert not ctx.get("privileged", False)
    assert pod_spec().get("automountServiceAccountToken") is False


def test_every_path_the_service_writes_is_a_writable_emptydir() -> None:
    """With the root file system read-only: /dev/shm for shared memory, /tmp as scratch for tasks
    (tempfile). The job store is Redis, so /data is not written (checked above)."""
    for path in ("/tmp", "/dev/shm"):
        volume = volume_of(path)
        assert "emptyDir" in volume, f"{path} must be an emptyDir (pod-local scratch), got {volume}"
        assert "sizeLimit" in volume["emptyDir"], f"{path} has no sizeLimit"


def test_service_links_are_off_so_kubernetes_injects_no_procbridge_variables() -> None:
    """With service links, the Service named procbridge would give every pod PROCBRIDGE_PORT=tcp://IP:80,
    a variable the service reads as its own port."""
    assert pod_spec().get("enableServiceLinks") is False


def test_deployment_leaves_the_replica_count_to_the_hpa() -> None:
    assert "replicas" not in deployment()["spec"], "kubectl apply would reset the HPA's count to it"
    assert deployment()["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# -- Service, HPA, disruption budget, job store ----------------------------------------------------


def test_service_selects_the_deployment_pods_and_targets_the_container_port() -> None:
    service = resource("Service", SERVER)
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], labels)
    assert labels_match(deployment()["spec"]["selector"], labels)
    ports = service["spec"]["ports"]
    assert ports and all(container_port(p["targetPort"]) == load([], env=server_env()).port for p in ports)
    others = {k: v for k, v in pod_templates().items() if k != f"Deployment/{SERVER}"}
    assert not [k for k, v in others.items() if labels_match(service["spec"]["selector"], v)]


def test_hpa_targets_the_deployment_by_name_with_min_and_max_replicas() -> None:
    hpa = resource("HorizontalPodAutoscaler", SERVER)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", SERVER)
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low < high, "at least two replicas, so that one pod going does not stop the service"
    metrics = hpa["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    # CPU utilization is measured against requests: without them the HPA cannot compute it.
    assert "cpu" in container()["resources"]["requests"]
    budget = resource("PodDisruptionBudget", SERVER)["spec"]
    assert labels_match(budget["selector"], deployment()["spec"]["template"]["metadata"]["labels"])
    assert budget["minAvailable"] < low, "the budget would block every node drain at the HPA's minimum"


def test_every_label_selector_selects_some_pod_template() -> None:
    """A Service, budget, network policy or spread constraint whose selector matches no pod is a silent
    no-op in a cluster."""
    templates = pod_templates()
    selectors: list[tuple[str, dict[str, Any]]] = []
    for d in all_resources():
        where = f"{d['kind']}/{d['metadata']['name']}"
        spec = d.get("spec", {})
        if d["kind"] in ("Service", "PodDisruptionBudget", "Deployment", "StatefulSet"):
            selectors.append((where, spec["selector"]))
        if d["kind"] == "NetworkPolicy":
            selectors.append((where, spec["podSelector"]))
            selectors += [(where + " ingress", peer["podSelector"])
                          for rule in spec.get("ingress", []) for peer in rule.get("from", []) if "podSelector" in peer]
        if d["kind"] in ("Deployment", "StatefulSet"):
            selectors += [(where + " spread", c["labelSelector"])
                          for c in spec["template"]["spec"].get("topologySpreadConstraints", [])]
    assert selectors
    for where, selector in selectors:
        assert any(labels_match(selector, labels) for labels in templates.values()), f"{where}: {selector}"


def test_store_secret_points_the_replicas_at_the_redis_service_in_the_manifests() -> None:
    url = urlsplit(load([], env=server_env()).store)
    redis = resource("Service", url.hostname or "")
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]
    statefulset = resource("StatefulSet", url.hostname or "")
    assert statefulset["spec"]["serviceName"] == redis["metadata"]["name"]
    assert labels_match(redis["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes", "a 202 promises the job is stored durably"


# -- the real server with the Deployment's read-only root file system ------------------------------


def _writable_mounts() -> list[str]:
    """Mount points to make read-only: every read-write one but the kernel's /proc, /sys and /dev (a
    container gets its own of those)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point in ("/proc", "/sys", "/dev") or point.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        if "rw" in fields[5].split(","):
            out.append(point)
    return out


def _stash_dir(covered_by: list[str]) -> str:
    """An empty folder on this machine outside every path the test mounts over (removed after)."""
    for base in ("/run", "/var/tmp", "/mnt", "/srv", "/root"):
        if os.path.isdir(base) and os.access(base, os.W_OK) and not any(
                Path(base).is_relative_to(path) for path in covered_by):
            return tempfile.mkdtemp(prefix="procbridge-ro-", dir=base)
    pytest.skip("no folder outside the Deployment's emptyDir paths to bind the checkout aside")


def _namespaces_allowed() -> str | None:
    """None, or why this machine cannot run the read-only test."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace with read-only remounts and tmpfs mounts)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
         "/tmp"], capture_output=True, text=True,
    )
    if probe.returncode != 0:
        return f"this machine refuses a new mount namespace with a tmpfs in it: {probe.stderr.strip()}"
    return None


def _in_namespace(pid: int, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=10)


def test_server_serves_on_a_read_only_root_with_only_the_deployment_emptydirs_writable(tmp_path: Path) -> None:
    """The server, started in its own mount namespace (nothing changes outside it) where every file
    system is read-only except a tmpfs at each emptyDir mountPath of the Deployment (size = sizeLimit),
    with the Deployment's environment (a local redis-server as its Redis, its CPU limit as the worker
    count): /readyz, a task call, a body through /dev/shm and an async job work, and the service did
    write in those volumes."""
    reason = _namespaces_allowed()
    if reason:
        pytest.skip(reason)
    need_redis_server()
    writable = []
    for mount in container()["volumeMounts"]:
        volume = volume_of(mount["mountPath"])
        if "emptyDir" in volume:
            assert Path(mount["mountPath"]).is_dir(), f"{mount['mountPath']} does not exist here to mount over"
            writable.append((mount["mountPath"], int(quantity(volume["emptyDir"]["sizeLimit"]))))
    q = shlex.quote
    # What the server runs from (the checkout, its venv, the interpreter) may itself lie under an
    # emptyDir path (a clone in /tmp): bound aside before the tmpfs covers it, bound back read-only.
    covered = sorted({str(Path(n).resolve()) for n in (ROOT, sys.prefix, sys.base_prefix)
                      if any(Path(n).resolve().is_relative_to(path) for path, _ in writable)})
    stash = _stash_dir([path for path, _ in writable]) if covered else None
    hide = [f"mkdir -p {q(f'{stash}/{i}')} && mount --bind {q(n)} {q(f'{stash}/{i}')}" for i, n in enumerate(covered)]
    steps = [f"{{ mount -o remount,bind,ro {q(p)} || {{ echo cannot make {q(p)} read-only >&2; exit 97; }}; }}"
             for p in _writable_mounts()]
    steps += [f"mount -t tmpfs -o size={size},mode=1777 tmpfs {q(path)}" for path, size in writable]
    steps += [f"mkdir -p {q(n)} && mount --bind {q(f'{stash}/{i}')} {q(n)} && mount -o remount,bind,ro {q(n)}"
              for i, n in enumerate(covered)]
    launcher = " && ".join([*hide, *steps, 'exec "$0" "$@"'])
    prefix = ("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", launcher)

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        env = server_env()
        env["PROCBRIDGE_STORE"] = redis.url("k8s-ro-test:")
        env["PROCBRIDGE_WORKERS"] = str(int(quantity(container()["resources"]["limits"]["cpu"])))
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # as in the image
        srv_dir = tmp_path / "server"
        srv = start_server(srv_dir, env=env, prefix=prefix)
        try:
            pid = srv.proc.pid
            # the root, the checkout and the interpreter are read-only for the server, even as root
            for path in ("/", str(ROOT), sys.prefix):
                probe = _in_namespace(pid, f"touch {q(os.path.join(path, '.procbridge-ro-probe'))}")
                assert probe.returncode != 0 and "Read-only" in probe.stderr, (path, probe.stderr)
            assert http("GET", srv.url + "/readyz").status == 200
            reply = post_json(srv.url + "/v1/tasks/primes", {"limit": 1000})
            assert reply.status == 200 and reply.json()["result"] == 168, reply
            body = os.urandom(2 * 2**20)  # above the 256 KiB shm threshold: goes through /dev/shm
            reply = http("POST", srv.url + "/v1/tasks/sha256", body, {"Content-Type": "application/octet-stream"})
            assert reply.status == 200 and reply.json()["result"] == hashlib.sha256(body).hexdigest(), reply
            job = post_json(srv.url + "/v1/jobs", {"task": "primes", "args": {"limit": 1000}})
            assert job.status == 202, job
            done = wait_for(lambda: (r := http("GET", srv.url + f"/v1/jobs/{job.json()['id']}").json())
                            ["status"] not in ("queued", "running") and r, 20, what="the job to finish")
            assert (done["status"], done["result"]) == ("succeeded", 168), done
            # the volumes are really used: without them these writes would have failed
            shm_names = _in_namespace(pid, "ls -A /dev/shm").stdout
            assert re.search(r"^pb_", shm_names, re.MULTILINE), f"no shared-memory segment: {shm_names}"
            assert srv.stop(timeout=30) == 0, srv.log()
            log = srv.log()
            assert "Read-only file system" not in log and "EROFS" not in log, log
        finally:
            srv.kill_all()
    finally:
        redis.stop()
        if stash is not None:
            shutil.rmtree(stash, ignore_errors=True)  # empty on the host: the binds lived in the namespace

