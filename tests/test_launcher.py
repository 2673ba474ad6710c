"""`flora-gateway serve` (what `make run` runs) as a user runs it: a separate process, on the
tiny GPTBigCode instead of SmolLM2 (fast to load), with its own redis-server, Ray cluster,
worker, router and demo tenants. The commands it prints work as pasted (the client for every
demo tenant, the grpcurl request, the adapterctl upload); Ctrl-C (SIGINT to its process group,
as a terminal sends it) stops it with status 0 and leaves none of its processes or ports behind,
also in the middle of starting; a second run on the same state keeps the tenants and their keys;
a start that cannot work is one line and a non-zero status.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from services.demo_adapters import write_synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.env import cache_root
from services.protos import gateway_pb2, gateway_pb2_grpc
from tests.adapters_store.helpers import free_port
from tests.gateway.tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240  # a loaded 2-core machine; ~20 s on a quiet one


# ---- processes -------------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command name, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue  # it exited while we looked
        name, fields = rest.rsplit(") ", 1)
        state, ppid = fields.split()[:2]
        table[int(pid)] = (int(ppid), name, state)
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every process below `root` now."""
    table, found, frontier = process_table(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, name, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = name
                frontier.append(pid)
    return found


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still alive (same pid and name, not a zombie)."""
    table = process_table()
    return {pid: name for pid, name in processes.items() if pid in table and table[pid][1] == name and table[pid][2] != "Z"}


# ---- one launcher run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """What persists between runs, and the ports every run uses."""

    cache: Path
    model_dir: Path
    ports: dict[str, int]

    def flags(self) -> list[str]:
        p = self.ports
        return ["--model", str(self.model_dir), "--threads", "1", "--listen", f"127.0.0.1:{p['listen']}",
                "--redis-port", str(p["redis"]), "--serve-grpc-port", str(p["serve_grpc"]), "--serve-http-port", str(p["serve_http"]),
                "--metrics-port", str(p["metrics"]), "--worker-metrics-port", str(p["worker_metrics"]),
                "--ray-metrics-port", str(p["ray_metrics"])]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLORA_CACHE_DIR": str(self.cache), "FLORA_WORKER_KV_CACHE_MIB": "16", "HF_HUB_OFFLINE": "1"}


class Launch:
    """`flora-gateway serve` in its own session (process group), its stdout read line by line."""

    def __init__(self, state: State):
        self.state, self.stderr_path = state, state.cache / f"serve-stderr-{time.monotonic_ns()}.txt"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", *state.flags()], cwd=REPO,
                                         env=state.env(), stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.processes: dict[int, str] = {}
        self.returncode: int | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no line starting {prefix!r} within {timeout_s:.0f} s:\n{self.output()}")
            if line is None:
                pytest.fail(f"flora-gateway serve exited ({self.proc.wait()}) before a line starting {prefix!r}:\n{self.output()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr:\n" + self.stderr_path.read_text()

    def printed(self, marker: str) -> str:
        return next(line.strip() for line in self.lines if marker in line)

    def ctrl_c(self, timeout_s: float = 30) -> int:
        """SIGINT to the whole process group, as a terminal's Ctrl-C; idempotent."""
        if self.returncode is None:
            self.processes = descendants(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.returncode = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"flora-gateway serve did not stop within {timeout_s} s of Ctrl-C:\n{self.output()}")
            self.drain()
        return self.returncode

    def drain(self) -> None:
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)

    def kill(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


PORTS = ("listen", "redis", "serve_grpc", "serve_http", "metrics", "worker_metrics", "ray_metrics")


def fresh_state(cache: Path, model_dir: Path) -> State:
    """An empty state directory and free ports."""
    # The engine's C++ kernels build into <cache>/torch_extensions (minutes on 2 cores): share the built ones.
    shared = cache_root() / "torch_extensions"
    shared.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "torch_extensions").symlink_to(shared)
    return State(cache, model_dir, {name: free_port() for name in PORTS})


def ports_in_use(state: State) -> list[str]:
    """Those of the state's ports a server could not listen on now."""
    busy = []
    for name, port in state.ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(f"{name} {port}")
    return busy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gptbigcode")


@pytest.fixture(scope="module")
def state(tmp_path_factory, model_dir: Path) -> State:
    return fresh_state(tmp_path_factory.mktemp("state") / "cache", model_dir)


@pytest.fixture(scope="module")
def first_run(state: State):
    launch = Launch(state)
    try:
        launch.wait_for_line("ready:")
        yield launch
    finally:
        launch.ctrl_c()


# ---- the printed commands ----------------------------------------------------------------------------


def printed_command(launch: Launch, marker: str) -> tuple[dict[str, str], list[str]]:
    """The printed line holding `marker`, split as a shell would: (VAR=value assignments, argv)."""
    words = shlex.split(launch.printed(marker))
    count = next(i for i, w in enumerate(words) if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))
    return dict(w.split("=", 1) for w in words[:count]), words[count:]


def printed_client_command(launch: Launch) -> tuple[dict[str, str], list[str]]:
    return printed_command(launch, " client generate ")


def run_printed(launch: Launch, tenant: str | None = None, key: str | None = None) -> subprocess.CompletedProcess:
    """Run the printed command as pasted; for another tenant, with its name and key swapped in."""
    assigned, argv = printed_client_command(launch)
    if tenant is not None:
        argv[argv.index("--tenant") + 1] = tenant
        assigned = {name: key for name in assigned}
    env = {k: v for k, v in launch.state.env().items() if k != "FLORA_API_KEY"}
    return subprocess.run(argv, cwd=REPO, env={**env, **assigned}, capture_output=True, text=True, timeout=120)


def keys_file(state: State) -> dict:
    return json.loads((state.cache / "demo-tenants.json").read_text())


def test_the_printed_command_works_for_every_demo_tenant(first_run: Launch, state: State):
    argv = printed_client_command(first_run)[1]
    assert argv[0] == ".venv/bin/flora-gateway" or argv[0].endswith("/flora-gateway")
    assert argv[1:3] == ["client", "generate"] and "--stream" in argv
    tenants = keys_file(state)["tenants"]
    assert [(name, t["kind"]) for name, t in tenants.items()] == [("user42", "flora rank 1"), ("acme", "lora rank 8"),
                                                                 ("initech", "ia3"), ("globex", "base model")]  # fmt: skip
    texts = {}
    for name, tenant in tenants.items():
        done = run_printed(first_run, name, tenant["api_key"])
        assert done.returncode == 0, f"{name}: {done.stderr}"
        served_by = f"{tenant['adapter']} (" if tenant["adapter"] else "base model |"
        assert done.stderr.startswith(f"[{served_by}"), done.stderr
        texts[name] = done.stdout
        assert done.stdout.strip(), f"{name}: no text"
    assert len(set(texts.values())) == 4  # each tenant is served by its own adapter (or none)


def test_the_printed_metrics_endpoints_serve_the_router_worker_and_ray_series(first_run: Launch, state: State):
    urls = re.findall(r"http://\S+/metrics", first_run.printed("metrics"))
    assert [int(url.split(":")[2].split("/")[0]) for url in urls] == [state.ports[p] for p in ("metrics", "worker_metrics", "ray_metrics")]
    bodies = [urllib.request.urlopen(url, timeout=10).read().decode() for url in urls]
    assert "# TYPE flora_requests_total counter" in bodies[0] and "process_resident_memory_bytes" in bodies[0]
    assert "flora_engine_kv_cache_blocks_capacity " in bodies[1] and 'flora_adapter_cache_hits_total{tier="blob"}' in bodies[1]
    assert "ray_" in bodies[2]


def test_the_keys_file_is_private(first_run: Launch, state: State):
    assert (state.cache / "demo-tenants.json").stat().st_mode & 0o777 == 0o600


def test_the_grpcurl_line_is_a_valid_call(first_run: Launch):
    """No grpcurl here: its -H header and -d body are sent as grpcurl would send them."""
    words = shlex.split(first_run.printed("grpcurl "))
    header, body = words[words.index("-H") + 1], words[words.index("-d") + 1]
    address, method = words[-2:]
    assert method == "flora.gateway.v1.Gateway/GenerateStream" and words[1] == "-plaintext"
    name, _, value = header.partition(": ")
    message = json_format.Parse(body, gateway_pb2.GenerateRequest())
    with grpc.insecure_channel(address) as channel:
        chunks = list(gateway_pb2_grpc.GatewayStub(channel).GenerateStream(message, metadata=((name, value),), timeout=60))
    assert chunks[0].adapter.ref == keys_file(first_run.state)["tenants"][message.tenant_id]["adapter"]
    assert "".join(c.text for c in chunks) and chunks[-1].finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED


def test_the_printed_adapterctl_line_adds_a_tenant_the_gateway_serves(first_run: Launch, tmp_path):
    env, words = printed_command(first_run, " upload ADAPTER ")
    adapter = write_synthetic_adapter(tmp_path / "mine.safetensors", AdapterKind.LORA, 4, ("attn.c_proj",),
                                      first_run.state.model_dir, env["FLORA_BASE_MODEL"], seed=5)  # fmt: skip
    argv = [str(adapter) if w == "ADAPTER" else "mine" if w == "NAME" else w for w in words]
    done = subprocess.run([*argv, "--json"], cwd=REPO, env={**first_run.state.env(), **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["api_key"]
    served = run_printed(first_run, "mine", key)
    assert served.returncode == 0 and served.stderr.startswith("[mine/default@1 (lora rank 4)"), served.stderr


def test_ctrl_c_stops_everything_it_started(first_run: Launch):
    assert first_run.ctrl_c() == 0, first_run.output()
    names = set(first_run.processes.values())
    assert {"redis-server", "raylet", "gcs_server"} <= names, names  # else the check below would prove nothing
    assert not still_running(first_run.processes)  # at its exit already: it waits for every process below it
    assert not ports_in_use(first_run.state)  # a `make run` right after works
    assert first_run.lines[-1] == "flora-gateway serve: stopped"


def test_ctrl_c_while_ray_starts_stops_what_had_started(model_dir: Path, tmp_path):
    launch = Launch(fresh_state(tmp_path / "cache", model_dir))
    launch.wait_for_line("  Ray ")
    deadline = time.monotonic() + 60
    while "raylet" not in descendants(launch.proc.pid).values():  # in the middle of ray.init
        assert time.monotonic() < deadline, f"no raylet within 60 s:\n{launch.output()}"
        time.sleep(0.05)
    assert launch.ctrl_c() == 130, launch.output()
    assert "flora-gateway serve: interrupted while starting; stopping what had started" in launch.stderr_path.read_text()
    assert not still_running(launch.processes)
    assert not ports_in_use(launch.state)  # Ray's agents started after the snapshot are gone too


def test_a_second_run_keeps_the_tenants_and_their_keys(first_run: Launch, state: State):
    """`make run` twice: the registry persisted in <cache>/redis; re-uploads change nothing."""
    first_run.ctrl_c()
    keys_before = keys_file(state)["tenants"]
    second = Launch(state)
    try:
        second.wait_for_line("ready:")
        assert keys_file(state)["tenants"] == keys_before
        done = run_printed(second)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        assert done.stderr.startswith(f"[{keys_before['user42']['adapter']} (flora rank 1)")
    finally:
        assert second.ctrl_c() == 0, second.output()


def test_a_port_in_use_is_one_line_and_status_1(model_dir: Path, tmp_path):
    busy = fresh_state(tmp_path / "cache", model_dir)
    with socket.create_server(("127.0.0.1", busy.ports["redis"])):
        done = subprocess.run([sys.executable, "-m", "services.cli", "serve", *busy.flags()], cwd=REPO, env=busy.env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"flora-gateway serve: error: port {busy.ports['redis']} for redis-server (--redis-port, FLORA_SERVE_REDIS_PORT): in use\n"


def test_a_bad_setting_is_one_line_naming_the_variable_and_status_2(model_dir: Path, tmp_path):
    env = {**fresh_state(tmp_path / "cache", model_dir).env(), "FLORA_WORKER_THREADS": "many"}
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--model", str(model_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("flora-gateway serve: error: FLORA_WORKER_THREADS='many': Input should be a valid integer")
    assert done.stderr.count("\n") == 1
