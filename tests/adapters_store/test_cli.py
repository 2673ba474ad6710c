"""adapterctl end to end, in-process, against the real Redis and S3 servers."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters_store import cli
from adapters_store.api_keys import hash_api_key
from adapters_store.names import AdapterRef
from adapters_store.registry import Quota, Registry
from adapters_store.store import AdapterStore
from adapters_store.validation import validate_bytes
from tests.adapters_store.conftest import BUCKET
from tests.adapters_store.helpers import adapter_bytes, free_port, run_cli, write_adapter

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_then_download_gives_identical_bytes(store_env, tmp_path):
    source = write_adapter(tmp_path / "user42.safetensors")
    sha = _sha(source)
    up = run_cli("upload", source, "--json")
    assert up.code == 0, up.err
    result = up.json
    assert result["version"]["ref"] == "user42/default@1" and result["tenant_created"] and result["added"]
    assert result["api_key"].startswith("flk_") and result["version"]["sha256"] == sha

    registry = Registry.connect(store_env.settings)
    record = registry.version("user42", "default", 1)
    key = f"{store_env.prefix}/sha256/{sha[:2]}/{sha}"
    assert (record.sha256, record.size, record.status, record.blob_uri) == (sha, source.stat().st_size, "ready", f"s3://{BUCKET}/{key}")
    assert (record.spec.kind.value, record.spec.rank, record.spec.alpha) == ("lora", 4, 8.0)
    assert store_env.s3_keys() == [key]
    assert registry.tenant("user42").alias == AdapterRef("user42", "default", 1)
    assert registry.tenant_for_key(hash_api_key(result["api_key"])) == "user42"

    down = run_cli("download", "user42", "-o", tmp_path / "copy.safetensors")
    assert down.code == 0, down.err
    assert (tmp_path / "copy.safetensors").read_bytes() == source.read_bytes()
    assert _sha(tmp_path / "copy.safetensors") == sha
    assert down.out.strip() == f"wrote {tmp_path / 'copy.safetensors'} (user42/default@1, {record.size} bytes, sha256 verified)"
    again = run_cli("download", "user42", "-o", tmp_path / "copy.safetensors")
    assert again.code == 5 and "copy.safetensors exists; pass --force to overwrite it" in again.err


def test_human_output_reads_well(store_env, tmp_path):
    up = run_cli("upload", write_adapter(tmp_path / "user42.safetensors"))
    assert up.code == 0, up.err
    lines = up.out.splitlines()
    assert lines[0].startswith("stored user42/default@1 (lora, rank 4, 2 modules, ")
    assert lines[1] == "tenant user42 now uses user42/default@1"
    assert lines[2] == "created tenant user42; its API key (shown once, store it now):" and lines[3].strip().startswith("flk_")

    listing = run_cli("list").out.splitlines()
    assert listing[0].split() == ["TENANT", "CURRENT", "ADAPTERS"] and listing[1].split() == ["user42", "user42/default@1", "1"]
    versions = run_cli("list", "user42").out.splitlines()
    assert versions[0].split() == ["VERSION", "KIND", "RANK", "SIZE", "STATUS", "CURRENT"]
    assert versions[1].split()[:3] == ["user42/default@1", "lora", "4"] and versions[1].split()[-2:] == ["ready", "*"]

    show = run_cli("show", "user42").out
    assert show.splitlines()[0] == "user42/default@1  (current)"
    assert "  rank        4 (alpha 8, scale 2)" in show and "  base model  test/tiny-gptbigcode" in show
    assert "  targets     2 modules: transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn" in show

    tenant = run_cli("tenant", "show", "user42").out
    assert "  current     user42/default@1" in tenant and "unlimited requests/min" in tenant


def test_duplicate_upload_is_idempotent(store_env, tmp_path):
    source = write_adapter(tmp_path / "user42.safetensors")
    assert run_cli("upload", source).code == 0
    again = run_cli("upload", source, "--json")
    assert again.code == 0, again.err
    assert (again.json["added"], again.json["blob_reused"], again.json["api_key"]) == (False, True, None)
    assert again.json["version"]["version"] == 1
    assert run_cli("upload", source).out.startswith("unchanged: identical to user42/default@1")
    assert len(store_env.s3_keys()) == 1
    assert [r.version for r in Registry.connect(store_env.settings).versions("user42", "default")] == [1]


def test_versions_assign_rollback_and_delete(store_env, tmp_path):
    for seed in (1, 2):
        assert run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=seed)).code == 0
    assert run_cli("show", "user42", "--json").json["ref"] == "user42/default@2"

    back = run_cli("rollback", "user42")
    assert (back.code, back.out.strip()) == (0, "tenant user42 rolled back to user42/default@1")
    refused = run_cli("delete", "user42/default@1")
    assert refused.code == 5 and "user42/default@1 is the current adapter of tenant user42" in refused.err
    assert run_cli("assign", "user42/default").out.strip() == "tenant user42 now uses user42/default@2"
    assert run_cli("assign", "user42/default@2").out.strip() == "tenant user42 already uses user42/default@2"

    sha1 = run_cli("show", "user42/default@1", "--json").json["sha256"]
    deleted = run_cli("delete", "user42/default@1")
    assert (deleted.code, deleted.out.strip()) == (0, "deleted user42/default@1 (blob removed)")
    assert all(sha1 not in key for key in store_env.s3_keys()) and len(store_env.s3_keys()) == 1
    assert run_cli("show", "user42/default@1", "--json").json["status"] == "deleted"
    missing = run_cli("assign", "user42/default@1")
    assert missing.code == 4 and "version user42/default@1 does not exist or was deleted" in missing.err
    gone = run_cli("download", "user42/default@1", "-o", tmp_path / "x")
    assert gone.code == 4 and "user42/default@1 was deleted" in gone.err


def test_delete_all_versions_refuses_while_one_is_current(store_env, tmp_path):
    for seed in (1, 2):
        run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=seed))
    assert run_cli("delete", "user42/default").code == 5
    assert len(Registry.connect(store_env.settings).versions("user42", "default")) == 2
    run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=3), "--name", "next")
    out = run_cli("delete", "user42/default", "--json")
    assert out.code == 0 and [d["deleted"] for d in out.json] == ["user42/default@1", "user42/default@2"]
    assert len(store_env.s3_keys()) == 1


def test_tenant_commands(store_env):
    created = run_cli("tenant", "create", "acme", "--requests-per-minute", "60", "--json")
    assert created.code == 0 and created.json["api_key"].startswith("flk_")
    registry = Registry.connect(store_env.settings)
    assert registry.tenant("acme").quota == Quota(60, 0, 0)
    assert run_cli("tenant", "create", "acme").code == 5

    rotated = run_cli("tenant", "rotate-key", "acme", "--json").json["api_key"]
    assert registry.tenant_for_key(hash_api_key(created.json["api_key"])) is None
    assert registry.tenant_for_key(hash_api_key(rotated)) == "acme"

    quota = run_cli("tenant", "set-quota", "acme", "--tokens-per-minute", "1000", "--max-concurrent", "4", "--json")
    assert quota.json["quota"] == {"requests_per_minute": 60, "tokens_per_minute": 1000, "max_concurrent": 4}
    nothing = run_cli("tenant", "set-quota", "acme")
    assert nothing.code == 2 and "needs at least one of --requests-per-minute" in nothing.err
    unknown = run_cli("tenant", "show", "ghost")
    assert (unknown.code, unknown.err.strip()) == (4, "adapterctl: error: tenant ghost does not exist")


def test_tenant_delete(store_env, tmp_path):
    """Refused while versions live; --force deletes them, their unshared blobs and the key; the name can be reused."""
    old_key = run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=1), "--json").json["api_key"]
    assert run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=2)).code == 0
    assert run_cli("upload", write_adapter(tmp_path / "team.safetensors", seed=1)).code == 0  # shares default@1's blob
    refused = run_cli("tenant", "delete", "user42")
    assert (refused.code, refused.err) == (5, "adapterctl: error: tenant user42 has 2 live adapter version(s): pass --force to delete them with the tenant\n")
    assert len(store_env.s3_keys()) == 2

    deleted = run_cli("tenant", "delete", "user42", "--force")
    assert (deleted.code, deleted.err) == (0, "")
    assert deleted.out.splitlines() == ["deleted user42/default@1", "deleted user42/default@2 (blob removed)",
                                        "deleted tenant user42; its API key no longer works"]  # fmt: skip
    team_sha = run_cli("show", "team", "--json").json["sha256"]
    assert store_env.s3_keys() == [f"{store_env.prefix}/sha256/{team_sha[:2]}/{team_sha}"]
    assert [k for k in store_env.redis_keys() if "user42" in k or k.startswith("flora:blob:")] == [
        "flora:adapter:user42:default:seq", f"flora:blob:{team_sha}", "flora:version:user42:default:1", "flora:version:user42:default:2",
    ]  # no tenant, key, history or adapter set; the blob being deleted is no longer flagged
    assert [t["tenant"] for t in run_cli("list", "--json").json] == ["team"]
    missing = run_cli("tenant", "delete", "user42", "--force")
    assert (missing.code, missing.err) == (4, "adapterctl: error: tenant user42 does not exist\n")

    registry = Registry.connect(store_env.settings)
    new_key = run_cli("tenant", "create", "user42", "--json").json["api_key"]
    assert registry.tenant_for_key(hash_api_key(old_key)) is None and registry.tenant_for_key(hash_api_key(new_key)) == "user42"
    assert run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=3)).out.startswith("stored user42/default@3 ")


def test_tenant_delete_without_versions_needs_no_force(store_env):
    assert run_cli("tenant", "create", "acme").code == 0
    deleted = run_cli("tenant", "delete", "acme", "--json")
    assert (deleted.code, deleted.json) == (0, {"tenant": "acme", "versions": []})
    assert store_env.redis_keys() == []


def test_upload_to_an_existing_tenant_with_options(store_env, tmp_path):
    run_cli("tenant", "create", "acme")
    source = write_adapter(tmp_path / "whatever.safetensors")
    up = run_cli("upload", source, "--tenant", "acme", "--name", "sql", "--no-assign", "--json")
    assert up.code == 0 and up.json["api_key"] is None and not up.json["alias_moved"]
    assert up.json["version"]["ref"] == "acme/sql@1"
    assert Registry.connect(store_env.settings).tenant("acme").alias is None


def test_json_errors_for_scripts(store_env):
    result = run_cli("show", "ghost", "--json")
    assert result.code == 4
    assert result.json == {"error": {"type": "NotFoundError", "message": "tenant ghost does not exist", "exit_code": 4}}


def test_local_directory_blob_store(store_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_BLOB_URL", str(tmp_path / "blobs"))
    source = write_adapter(tmp_path / "user42.safetensors")
    assert run_cli("upload", source).code == 0
    assert run_cli("download", "user42", "-o", tmp_path / "copy.safetensors").code == 0
    assert (tmp_path / "copy.safetensors").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [_sha(source)]
    # The registry remembers where the blob lives: a store pointed elsewhere says so instead of guessing.
    other = run_cli("download", "user42", "-o", tmp_path / "x", "--blob-url", str(tmp_path / "elsewhere"))
    assert other.code == 2 and "is stored at file://" in other.err


def test_options_override_the_environment(store_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    source = write_adapter(tmp_path / "user42.safetensors")
    assert run_cli("upload", source, "--redis-url", store_env.redis.url).code == 0
    assert run_cli("--redis-url", store_env.redis.url, "list", "--json").json[0]["tenant"] == "user42"


def test_validate_needs_no_servers(store_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("FLORA_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = run_cli("validate", write_adapter(tmp_path / "a.safetensors"))
    assert result.code == 0 and result.out.startswith(f"{tmp_path / 'a.safetensors'}: ok: lora adapter, rank 4, 2 modules")
    assert run_cli("validate", tmp_path / "a.safetensors", "--json").json["valid"] is True


def test_base_model_must_be_configured(store_env, tmp_path, monkeypatch):
    monkeypatch.delenv("FLORA_BASE_MODEL_CONFIG")
    result = run_cli("validate", write_adapter(tmp_path / "a.safetensors"))
    assert result.code == 2 and "set FLORA_BASE_MODEL and FLORA_BASE_MODEL_CONFIG or pass --model-id and --model-config" in result.err


COMMANDS = ["upload", "validate", "list", "show", "assign", "rollback", "delete", "download", "tenant",
            "tenant create", "tenant show", "tenant rotate-key", "tenant set-quota", "tenant delete"]  # fmt: skip


def test_main_help_lists_every_command():
    result = run_cli("--help")
    assert result.code == 0 and result.out.startswith("usage: adapterctl ")
    for command in ("upload", "validate", "list", "show", "assign", "rollback", "delete", "download", "tenant"):
        assert f"\n    {command} " in result.out
    assert "exit codes: 0 ok, 2 bad usage or name, 3 invalid adapter" in result.out
    assert "FLORA_REDIS_URL" in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_focused_help(command):
    result = run_cli(*command.split(), "--help")
    assert result.code == 0 and result.out.startswith(f"usage: adapterctl {command} ")
    description = result.out.split("\n\n")[1]
    assert description[0].isupper() and description.rstrip().endswith((".", "once)"))
    assert "--redis-url URL" not in result.out  # common options are described in the main help only
    assert "see `adapterctl --help`" in result.out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["frobnicate"], "invalid choice: 'frobnicate'"), (["upload"], "the following arguments are required: FILE|DIR"),
     (["show", "a/b/c"], "adapter name 'b/c' contains a path separator"), (["tenant"], "the following arguments are required: COMMAND")],
)  # fmt: skip
def test_usage_errors_exit_2(args, message):
    result = run_cli(*args)
    assert result.code == 2 and message in result.err


def _upload_process(source: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "adapters_store.cli", "upload", str(source), "--json", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_two_concurrent_uploads_for_one_tenant(store_env, tmp_path):
    """Two adapterctl processes at once: both versions recorded, the tenant created once,
    the alias on exactly one of them (the one registered last)."""
    sources = []
    for i in range(2):
        (tmp_path / f"u{i}").mkdir()
        sources.append(write_adapter(tmp_path / f"u{i}" / "team.safetensors", seed=i))
    processes = [_upload_process(s) for s in sources]
    results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    outputs = [json.loads(out) for _, out, _ in results]
    assert sorted(o["version"]["version"] for o in outputs) == [1, 2]
    assert sorted(o["version"]["sha256"] for o in outputs) == sorted(_sha(s) for s in sources)
    assert sum(o["api_key"] is not None for o in outputs) == 1
    registry = Registry.connect(store_env.settings)
    assert registry.tenant("team").alias == AdapterRef("team", "default", 2)
    assert registry.tenant("team").alias in [AdapterRef("team", "default", o["version"]["version"]) for o in outputs]
    assert len(store_env.s3_keys()) == 2


def _concurrently(count: int, work) -> list:
    """Run work(i) for i < count in threads released together; re-raise the first failure."""
    barrier, results, errors = threading.Barrier(count), [None] * count, []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as e:  # re-raised below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_uploads_through_the_store(store_env):
    """Six uploaders (own connections each) for one tenant: six versions, the alias on exactly one."""
    store = AdapterStore.open(store_env.settings)
    adapters = [prepare_bytes(adapter_bytes(seed=i), store) for i in range(6)]
    results = _concurrently(6, lambda i: AdapterStore.open(store_env.settings).upload(adapters[i], "team"))
    assert sorted(r.registration.version.version for r in results) == [1, 2, 3, 4, 5, 6]
    assert sum(r.api_key is not None for r in results) == 1
    assert store.registry.tenant("team").alias == AdapterRef("team", "default", 6)


def test_concurrent_identical_uploads_record_one_version(store_env):
    store = AdapterStore.open(store_env.settings)
    adapter = prepare_bytes(adapter_bytes(), store)
    results = _concurrently(4, lambda i: AdapterStore.open(store_env.settings).upload(adapter, "team"))
    assert [r.registration.version.version for r in results] == [1, 1, 1, 1]
    assert sorted(r.registration.added for r in results) == [False, False, False, True]
    assert len(store_env.s3_keys()) == 1


def prepare_bytes(data: bytes, store: AdapterStore):
    return validate_bytes(data, "<test>", store.base_model(), store.settings.limits)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _on_terminal(*args: str) -> str:
    """adapterctl's stderr when stderr is a terminal."""
    terminal = _Terminal()
    with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(a) for a in args]) == 0
    return terminal.getvalue()


def test_progress_bars_on_a_terminal_only(store_env, tmp_path):
    source = write_adapter(tmp_path / "user42.safetensors")
    assert "upload user42: " in _on_terminal("upload", source)
    assert "download user42/default@1: " in _on_terminal("download", "user42", "-o", tmp_path / "copy")
    assert "download" not in _on_terminal("download", "user42", "-o", tmp_path / "copy", "--force", "--json")
    assert "upload" not in _on_terminal("upload", source, "--no-progress")
    assert "upload" not in run_cli("upload", source).err  # stderr is not a terminal
