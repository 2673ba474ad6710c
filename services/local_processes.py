"""The processes `flora-gateway serve` starts, and how it stops them all: none outlives it.

  Stops          what to stop, last started first, each even when one before it fails
  redis-server   its own session (a terminal's Ctrl-C reaches only the launcher), killed with it
  leftovers      the launcher is a Linux subreaper, so orphans of Ray's processes become its
                 children and the last stop can end every one of them
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROG = "flora-gateway serve"


class LaunchError(Exception):
    """A start that cannot go on; the message is the one line the user sees."""


class SettingsError(LaunchError):
    """A bad flag or environment variable; the message names it."""


class Stops:
    """What to stop, last started first; each stop runs even when one before it fails."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], object]] = []
        self.served = False  # once ready, stopping is announced: "stopped" is the last line

    def add(self, stop: Callable[[], object]) -> None:
        self._stops.append(stop)

    def run(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception as error:  # noqa: BLE001 - whatever one stop raises, the rest must still stop
                print(f"{PROG}: while stopping: {one_line(error)}", file=sys.stderr, flush=True)
        if self.served:
            print(f"{PROG}: stopped", flush=True)


# ---- every process started, however deep ------------------------------------------------------------

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(option, value)


def become_subreaper() -> None:
    """Orphans below the launcher become its children instead of init's (Linux), so that stopping
    can find every process Ray started: an agent that outlives its raylet for a few seconds, or
    all of them after a Ctrl-C in the middle of ray.init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def children() -> dict[int, str]:
    """pid -> state letter of the launcher's child processes ('Z': exited, not yet reaped)."""
    me, found = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        if int(fields[1]) == me:
            found[int(stat.parent.name)] = fields[0]
    return found


def end_leftovers(grace_s: float = 5.0, timeout_s: float = 15.0) -> None:
    """The last stop: reap exited children; SIGTERM live ones, SIGKILL them after `grace_s`; until
    none is left, so that no process and no port outlives the launcher."""
    start, termed = time.monotonic(), set()
    while (left := children()) and time.monotonic() - start < timeout_s:
        for pid, state in left.items():
            try:
                if state == "Z":
                    os.waitpid(pid, os.WNOHANG)
                elif pid not in termed or time.monotonic() - start > grace_s:
                    os.kill(pid, signal.SIGTERM if pid not in termed else signal.SIGKILL)
                    termed.add(pid)
            except (ProcessLookupError, ChildProcessError):
                pass  # it exited, or its own Popen reaped it, meanwhile
        time.sleep(0.05)


# ---- redis-server -----------------------------------------------------------------------------------


def terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout_s`; a no-op once it has exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RedisProcess:
    proc: subprocess.Popen
    port: int
    log: Path

    def stop(self) -> None:
        """SIGTERM: redis-server flushes its append-only file and exits."""
        terminate(self.proc, timeout_s=15)

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; Ray does the same for its processes)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_redis(directory: Path, port: int, on_stop: Stops, timeout_s: float = 15) -> RedisProcess:
    """redis-server on 127.0.0.1:`port`, data in `directory`, answering PING when this returns. Its own
    session, so a terminal's Ctrl-C reaches only the launcher, which stops it last."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError("redis-server is not installed: `make install` installs it (scripts/install-system-deps.sh), "
                          "or apt-get install -y redis-server")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
            "--logfile", str(log), "--daemonize", "no"]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
    server = RedisProcess(proc, port, log)
    on_stop.add(server.stop)
    wait_for_ping(server, timeout_s)
    return server


def wait_for_ping(server: RedisProcess, timeout_s: float) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if server.proc.poll() is not None:
                raise LaunchError(f"redis-server exited with status {server.proc.returncode}: {server.last_log_line()}") from None
            if time.monotonic() > deadline:
                raise LaunchError(f"redis-server did not answer on 127.0.0.1:{server.port} within {timeout_s:.0f} s "
                                  f"(log: {server.log})") from None  # fmt: skip
            time.sleep(0.05)
        finally:
            client.close()


def one_line(error: BaseException) -> str:
    """An error's message on one line: its first line, and its last when there are more (the last
    line of a traceback in a message says what went wrong)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
