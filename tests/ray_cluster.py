"""A real multi-node Ray cluster on this machine, for tests and benchmarks.

A head started with `ray start --head` (GCS, dashboard and Jobs API on 127.0.0.1, free ports) and
worker nodes joined with `ray start --address`, each its own raylet with `--num-cpus` and a custom
resource naming it. Token authentication is on (RAY_AUTH_MODE=token): the token lives only in the
environment of the cluster's processes and of the clients a test gives it to.

Each node runs under a `ray start --block` process, which stops that node's processes when it is
told to; teardown also kills whatever those processes left behind, so no raylet outlives the fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.s3_server import free_port

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB; tests move tiny objects
WORKER_NODE = "worker_node"  # a resource only the worker nodes offer
STOP_GRACE_S = 10  # for `ray stop`-like shutdown of a node's processes; whatever is left is killed
NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([
    {"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "resources": n["Resources"]}
    for n in ray.nodes() if n["Alive"]
]))
"""
FREE_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps(ray.available_resources()))
"""

# Ray Train asks a detached actor that every job shares, the AutoscalingCoordinator, which nodes its worker
# group may use; a job stopped with `ray job stop` never withdraws its request, which holds its nodes for
# 180 s, so an elastic run submitted after it starts smaller than the free nodes allow.
FORGET_RESERVATIONS_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
try:
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
except ValueError:  # no Ray Train run has asked it for anything yet
    print(json.dumps([]))
    raise SystemExit
def forget(actor):
    requesters = list(actor._ongoing_reqs)
    for requester in requesters:
        actor.cancel_request(requester)
    actor._tick()  # and look at the nodes afresh: a node that left and joined again has a new id
    return requesters
print(json.dumps(ray.get(coordinator.__ray_call__.remote(forget))))
"""


@dataclass
class Node:
    """One `ray start --block` process and the node it runs."""

    name: str
    process: subprocess.Popen
    log: Path
    node_id: str | None = None
    tree: list[int] = field(default_factory=list)  # pids seen under it, killed at teardown if still alive


class LocalRayCluster:
    """Head plus named worker nodes, started with the `ray` CLI; `env` is what a client needs to use it."""

    def __init__(self, workdir: Path, base_env: dict[str, str], head_cpus: int = 1):
        self.workdir = workdir
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.head_cpus = head_cpus
        # Short: Ray's socket paths live under it and a Unix socket path has ~107 characters at most.
        self.temp_dir = tempfile.mkdtemp(prefix="kr", dir="/tmp")
        self.node_env = {
            **base_env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead in seconds, not Ray's default half minute (the GCS pings each
            # raylet every second and gives up after three missed pings), and a worker group that cannot
            # be placed is given up on after 30 s instead of 60: the stories here lose nodes on purpose.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "5000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}",
        }
        self.nodes: dict[str, Node] = {}
        self.node_dirs: list[str] = []  # each worker node's own --temp-dir

    @property
    def address(self) -> str:
        """The Jobs API (dashboard) address clients submit to."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """The GCS address nodes and `ray.init` connect to."""
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self, base: dict[str, str]) -> dict[str, str]:
        """base plus the token, as a user's shell would have it (no RAY_ADDRESS: commands say --address)."""
        env = {k: v for k, v in base.items() if k not in ("RAY_ADDRESS",)}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self, worker_nodes: tuple[str, ...] = ("node_a", "node_b")) -> LocalRayCluster:
        """Start the head, then each worker node with one CPU; return once all are alive."""
        self._launch(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
                '--resources={"head": 1}',
            ],
        )
        self.wait_for_jobs_api()
        self.nodes["head"].node_id = self.wait_for_node("head")
        for name in worker_nodes:
            self.add_node(name)
        return self

    def add_node(self, name: str) -> None:
        """Join a worker node with one CPU, the custom resource `name` and `worker_node` (every worker node has
        it, so `cluster.resources_per_worker={worker_node:1}` keeps workers off the head); wait until it is seen."""
        resources = json.dumps({name: 1, WORKER_NODE: 1})
        # A folder of its own, as a machine of its own has: nodes sharing one would share one runtime-env
        # cache, and one node's cleanup would delete a job's working_dir from under another node's driver.
        temp_dir = tempfile.mkdtemp(prefix="kr", dir="/tmp")
        self.node_dirs.append(temp_dir)
        self._launch(
            name,
            [f"--address={self.gcs_address}", "--num-cpus=1", f"--resources={resources}", f"--temp-dir={temp_dir}"],
        )
        self.nodes[name].node_id = self.wait_for_node(name)

    def _launch(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"ray-{name}.log"
        process = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                *args,
            ],
            env=self.node_env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a test's SIGINT to pytest must not reach the cluster
        )
        self.nodes[name] = Node(name, process, log)

    def wait_for_jobs_api(self, timeout: float = 90) -> None:
        """Until the dashboard answers (401 without a token is an answer)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                self._check_alive("head")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head's Jobs API did not answer at {self.address}") from None
                time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        """Ray's view of its alive nodes (id, address, resources), asked by a client holding the token."""
        return self._ask(NODES_SCRIPT, default=[])

    def _ask(self, script: str, default):
        """Run `script` as a client of the cluster; the JSON of its last line, or `default` if it failed."""
        result = subprocess.run(
            [sys.executable, "-c", script, self.gcs_address],
            env=self.node_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else default

    def free_resources(self) -> dict[str, float]:
        """Ray's view of what no task or actor holds now, summed over the alive nodes."""
        return self._ask(FREE_SCRIPT, default={})

    def wait_until_free(self, resource: str, amount: float, timeout: float = 120) -> None:
        """Until `amount` of `resource` is free: an earlier test's stopped job may still hold its workers."""
        deadline = time.monotonic() + timeout
        while (free := self.free_resources().get(resource, 0)) < amount:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {free} of {amount} {resource} free after {timeout:.0f}s")
            time.sleep(1)

    def forget_train_reservations(self) -> list[str]:
        """Withdraw every Ray Train resource request still held (call only while no job runs); their requesters."""
        return self._ask(FORGET_RESERVATIONS_SCRIPT, default=None)

    def wait_for_node(self, name: str, timeout: float = 90) -> str:
        """The node id of the node offering resource `name`, once it is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            for node in self.alive_nodes():
                if name in node["resources"]:
                    return node["node_id"]
            time.sleep(1)
        raise RuntimeError(f"node {name} did not join the cluster within {timeout:.0f}s; see {self.nodes[name].log}")

    def _check_alive(self, name: str) -> None:
        node = self.nodes[name]
        if node.process.poll() is not None:
            tail = "\n".join(node.log.read_text(errors="replace").splitlines()[-15:])
            code = node.process.returncode
            raise RuntimeError(f"`ray start` for {name} exited with {code}; {node.log} ends:\n{tail}")

    def processes_of(self, node_id: str) -> list[psutil.Process]:
        """The raylet of node_id (found by the --node_id it was started with) and every process under it."""
        for proc in psutil.process_iter(["cmdline"]):
            if f"--node_id={node_id}" in (proc.info["cmdline"] or []):
                try:
                    return [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return []
        return []

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL a worker node's raylet and everything under it (its workers, agents): a lost machine."""
        node = self.nodes.pop(name)
        assert node.node_id, f"{name} never joined"
        victims = self.processes_of(node.node_id)
        assert victims, f"no raylet with --node_id={node.node_id}"
        for proc in victims:
            with _gone_ok():
                proc.kill()
        psutil.wait_procs(victims, timeout=10)
        with _gone_ok():
            node.process.kill()  # its `ray start --block` supervisor, so it restarts nothing
        node.process.wait(timeout=10)
        return [p.pid for p in victims]

    def stop(self) -> None:
        """Stop every node (workers first, then the head) and kill anything any of them left behind."""
        supervisors = [
            p for p in (psutil.Process(n.process.pid) for n in self.nodes.values() if n.process.poll() is None)
        ]
        tree = {p.pid: p for s in supervisors for p in _tree(s)}
        for node in self.nodes.values():
            tree.update({p.pid: p for p in self.processes_of(node.node_id)} if node.node_id else {})
        # Worker nodes together, then the head; what a node has not stopped in STOP_GRACE_S is killed below.
        for group in ([n for n in self.nodes.values() if n.name != "head"], [self.nodes.get("head")]):
            running = [n for n in group if n is not None and n.process.poll() is None]
            for node in running:
                node.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for node in running:
                try:
                    node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.process.kill()
        for proc in tree.values():
            with _gone_ok():
                proc.kill()
        psutil.wait_procs(list(tree.values()), timeout=10)
        for pid in self.leftovers():  # anything started with one of this cluster's temp dirs
            with _gone_ok():
                psutil.Process(pid).kill()
        self.nodes.clear()

    def leftovers(self) -> list[int]:
        """Pids of processes still running with one of this cluster's temp dirs (none, after stop())."""
        dirs = [self.temp_dir, *self.node_dirs]
        return [
            proc.pid
            for proc in psutil.process_iter(["cmdline"])
            if any(d in arg for d in dirs for arg in proc.info["cmdline"] or [])
        ]


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class _gone_ok:
    """Ignore a process that already exited."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)
