"""The Redis registry against a real redis-server: tenants, versions, aliases, deletion, notices."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from adapters_store import registry as registry_module
from adapters_store.api_keys import hash_api_key, new_api_key
from adapters_store.errors import ConflictError, NotFoundError
from adapters_store.names import AdapterRef
from adapters_store.registry import Quota, Registry
from tests.adapters_store.helpers import lora_spec

SPEC = lora_spec()


def _sha(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture
def registry(store_env) -> Registry:
    return Registry.connect(store_env.settings)


def _register(registry: Registry, tenant: str = "u1", name: str = "default", i: int = 1, **kw):
    return registry.register(tenant, name, SPEC, _sha(i), 100 + i, f"s3://b/{_sha(i)}", **kw)


def test_tenant_keys_are_stored_only_as_hashes(registry, store_env):
    token, key_hash = new_api_key()
    registry.create_tenant("u1", key_hash, Quota(requests_per_minute=60))
    everything = json.dumps([store_env.redis.client().dump(k).hex() for k in store_env.redis_keys()])
    assert token not in everything and token.encode().hex() not in everything
    assert registry.tenant_for_key(hash_api_key(token)) == "u1"
    record = registry.tenant("u1")
    assert (record.key_sha256, record.alias, record.quota) == (key_hash, None, Quota(60, 0, 0))
    with pytest.raises(ConflictError, match="^tenant u1 already exists$"):
        registry.create_tenant("u1", key_hash)


def test_rotating_a_key_retires_the_old_one(registry):
    old, old_hash = new_api_key()
    registry.create_tenant("u1", old_hash)
    _, new_hash = new_api_key()
    registry.rotate_key("u1", new_hash)
    assert registry.tenant_for_key(old_hash) is None and registry.tenant_for_key(new_hash) == "u1"
    with pytest.raises(NotFoundError, match="^tenant nobody does not exist$"):
        registry.rotate_key("nobody", new_hash)


def test_quota_changes_only_the_fields_given(registry):
    registry.create_tenant("u1", "h", Quota(1, 2, 3))
    registry.set_quota("u1", {"tokens_per_minute": 500})
    assert registry.tenant("u1").quota == Quota(1, 500, 3)
    with pytest.raises(NotFoundError):
        registry.set_quota("ghost", {"max_concurrent": 1})


def test_register_records_the_version_and_moves_the_alias(registry):
    registration = _register(registry, new_tenant_key_sha256="h")
    record = registration.version
    assert (registration.added, registration.tenant_created, registration.alias_moved) == (True, True, True)
    assert (record.ref, record.spec, record.sha256, record.size, record.status) == (AdapterRef("u1", "default", 1), SPEC, _sha(1), 101, "ready")
    assert record.blob_uri == f"s3://b/{_sha(1)}" and record.created_at > 0
    assert registry.tenant("u1").alias == AdapterRef("u1", "default", 1)
    assert registry.blob_refs(_sha(1)) == {"u1/default@1"}


def test_register_needs_the_tenant_unless_asked_to_create_it(registry):
    with pytest.raises(NotFoundError, match="^tenant u1 does not exist$"):
        _register(registry)
    assert registry.tenants() == []


def test_same_bytes_again_are_idempotent(registry):
    _register(registry, new_tenant_key_sha256="h")
    again = _register(registry)
    assert (again.added, again.alias_moved, again.version.version) == (False, False, 1)
    assert [r.version for r in registry.versions("u1", "default")] == [1]


def test_alias_history_rollback_and_assign(registry):
    registry.create_tenant("u1", "h")
    for i in (1, 2, 3):
        _register(registry, i=i)
    assert registry.tenant("u1").alias == AdapterRef("u1", "default", 3)
    assert registry.rollback("u1") == AdapterRef("u1", "default", 2)  # undoes the last move
    assert registry.rollback("u1") == AdapterRef("u1", "default", 1)
    with pytest.raises(ConflictError, match="nothing to roll back to: u1 is on default@1, its oldest live version"):
        registry.rollback("u1")
    assert registry.assign("u1", "default") == (AdapterRef("u1", "default", 3), True)  # newest
    assert registry.assign("u1", "default", 3) == (AdapterRef("u1", "default", 3), False)
    assert registry.rollback("u1", to_version=2) == AdapterRef("u1", "default", 2)
    with pytest.raises(ConflictError, match="rollback goes to an earlier version: u1 is on default@2, asked for version 3"):
        registry.rollback("u1", to_version=3)
    with pytest.raises(NotFoundError, match="version u1/default@9 does not exist or was deleted"):
        registry.assign("u1", "default", 9)


def test_rollback_without_history_goes_to_the_previous_version(registry):
    registry.create_tenant("u1", "h")
    _register(registry, i=1, assign=False)
    _register(registry, i=2)
    assert registry.rollback("u1") == AdapterRef("u1", "default", 1)


def test_delete_refuses_referenced_versions_and_frees_unreferenced_blobs(registry):
    registry.create_tenant("u1", "h")
    _register(registry, i=1)
    _register(registry, i=2)
    with pytest.raises(ConflictError, match="u1/default@2 is the current adapter of tenant u1"):
        registry.delete_version("u1", "default", 2)
    assert registry.delete_version("u1", "default", 1) == (_sha(1), True)
    assert registry.version("u1", "default", 1).status == "deleted"
    assert registry.blob_deleting(_sha(1))  # the caller now deletes the blob
    with pytest.raises(NotFoundError, match="version u1/default@1 does not exist or was deleted"):
        registry.assign("u1", "default", 1)
    with pytest.raises(ConflictError, match="nothing to roll back to"):
        registry.rollback("u1")  # the deleted version left the history too


def test_a_shared_blob_is_freed_only_by_its_last_version(registry):
    registry.create_tenant("u1", "h")
    registry.create_tenant("u2", "h2")
    _register(registry, "u1", i=7, assign=False)
    _register(registry, "u2", i=7, assign=False)
    assert registry.delete_version("u1", "default", 1) == (_sha(7), False)
    assert registry.delete_version("u2", "default", 1) == (_sha(7), True)


def test_delete_waits_for_in_flight_requests_unless_forced(registry):
    registry.delete_grace_s = 3600
    registry.create_tenant("u1", "h")
    _register(registry, i=1)
    _register(registry, i=2)  # the alias just left version 1
    with pytest.raises(ConflictError, match=r"u1/default@1 was the current adapter 0 s ago .* retry after 3600 s or pass --force"):
        registry.delete_version("u1", "default", 1)
    assert registry.delete_version("u1", "default", 1, force=True)[1]


def test_uploads_wait_while_their_blob_is_being_deleted(registry):
    registry.create_tenant("u1", "h")
    _register(registry, i=1, assign=False)
    registry.delete_version("u1", "default", 1)
    with pytest.raises(registry_module.BlobBusy, match=f"blob {_sha(1)} is being deleted right now"):
        _register(registry, i=1)
    registry.finish_blob_delete(_sha(1))
    assert _register(registry, i=1).version.version == 2


def _notices(pubsub, count: int) -> list[dict]:
    """The next `count` change notices (fewer if they do not come within 5 s), without their times."""
    messages, deadline = [], time.monotonic() + 5
    while len(messages) < count and time.monotonic() < deadline:
        if (message := pubsub.get_message(timeout=0.5)) is not None:
            messages.append({k: v for k, v in json.loads(message["data"]).items() if k != "at"})
    return messages


def test_every_change_is_announced(registry):
    pubsub = registry.subscribe()
    registry.create_tenant("u1", "h")
    _register(registry, i=1)
    _register(registry, i=2)
    registry.rollback("u1")
    registry.delete_version("u1", "default", 2)
    registry.set_quota("u1", {"max_concurrent": 2})
    registry.rotate_key("u1", "h2")
    assert _notices(pubsub, 9) == [
        {"event": "tenant_created", "tenant": "u1"},
        {"event": "version_added", "tenant": "u1", "adapter": "default", "version": 1},
        {"event": "alias_moved", "tenant": "u1", "adapter": "default", "version": 1},
        {"event": "version_added", "tenant": "u1", "adapter": "default", "version": 2},
        {"event": "alias_moved", "tenant": "u1", "adapter": "default", "version": 2, "from": "default@1"},
        {"event": "alias_moved", "tenant": "u1", "adapter": "default", "version": 1, "from": "default@2"},
        {"event": "version_deleted", "tenant": "u1", "adapter": "default", "version": 2},
        {"event": "quota_changed", "tenant": "u1"},
        {"event": "key_rotated", "tenant": "u1"},
    ]


def _tenant_with_versions(registry: Registry) -> str:
    """Tenant u1 with default@1, default@2 (current, default@1 in its history) and other@1, whose
    blob tenant u2's default@1 shares. Returns u1's key hash."""
    key_hash = new_api_key()[1]
    registry.create_tenant("u1", key_hash)
    _register(registry, i=1)
    _register(registry, i=2)
    _register(registry, "u1", "other", i=3, assign=False)
    registry.create_tenant("u2", "h2")
    _register(registry, "u2", i=3)
    return key_hash


def test_deleting_a_tenant_is_refused_while_it_has_live_versions(registry, store_env):
    _tenant_with_versions(registry)
    client = store_env.redis.client()
    before = {k: client.dump(k) for k in store_env.redis_keys()}
    with pytest.raises(ConflictError, match=r"^tenant u1 has 3 live adapter version\(s\): pass --force to delete them with the tenant$"):
        registry.delete_tenant("u1")
    assert {k: client.dump(k) for k in store_env.redis_keys()} == before
    with pytest.raises(NotFoundError, match="^tenant ghost does not exist$"):
        registry.delete_tenant("ghost", force=True)


def test_deleting_a_tenant_with_force_leaves_only_its_deleted_versions_and_counters(registry, store_env):
    key_hash = _tenant_with_versions(registry)
    assert registry.delete_tenant("u1", force=True) == [
        (AdapterRef("u1", "default", 1), _sha(1), True),
        (AdapterRef("u1", "default", 2), _sha(2), True),
        (AdapterRef("u1", "other", 1), _sha(3), False),  # u2 still uses this blob
    ]
    u1_left = ["flora:adapter:u1:default:seq", "flora:adapter:u1:other:seq",
               "flora:version:u1:default:1", "flora:version:u1:default:2", "flora:version:u1:other:1"]  # fmt: skip
    being_deleted = [f"flora:blob:{_sha(1)}:deleting", f"flora:blob:{_sha(2)}:deleting"]  # until the store deletes them
    u2 = ["flora:adapter:u2:default:seq", "flora:adapter:u2:default:versions", f"flora:blob:{_sha(3)}",
          "flora:apikey:h2", "flora:tenant:u2", "flora:tenant:u2:adapters", "flora:tenants", "flora:version:u2:default:1"]  # fmt: skip
    assert store_env.redis_keys() == sorted(u1_left + being_deleted + u2)
    assert {r.status for name in ("default", "other") for r in registry.versions("u1", name)} == {"deleted"}
    assert registry.tenants() == ["u2"] and registry.tenant_for_key(key_hash) is None
    assert registry.blob_refs(_sha(3)) == {"u2/default@1"}


def test_a_deleted_tenant_can_be_created_again_with_a_new_key(registry):
    old_hash = _tenant_with_versions(registry)
    registry.delete_tenant("u1", force=True)
    new_hash = new_api_key()[1]
    registry.create_tenant("u1", new_hash)
    assert registry.tenant_for_key(old_hash) is None and registry.tenant_for_key(new_hash) == "u1"
    assert registry.tenant("u1").alias is None and registry.adapters("u1") == []
    # Version numbers continue: u1/default@1 keeps meaning the deleted adapter, never a new one.
    assert _register(registry, i=4).version.ref == AdapterRef("u1", "default", 3)
    registry.create_tenant("empty", "h3")
    assert registry.delete_tenant("empty") == []  # nothing live: no --force needed


def test_deleting_a_tenant_announces_its_versions_then_the_tenant(registry):
    _tenant_with_versions(registry)
    pubsub = registry.subscribe()
    registry.delete_tenant("u1", force=True)
    assert _notices(pubsub, 4) == [
        {"event": "version_deleted", "tenant": "u1", "adapter": "default", "version": 1},
        {"event": "version_deleted", "tenant": "u1", "adapter": "default", "version": 2},
        {"event": "version_deleted", "tenant": "u1", "adapter": "other", "version": 1},
        {"event": "tenant_deleted", "tenant": "u1"},
    ]


def test_concurrent_registrations_each_get_a_version_and_the_alias_ends_on_the_last(registry, store_env):
    registry.create_tenant("u1", "h")
    barrier, errors = threading.Barrier(8), []

    def upload(i: int) -> None:
        try:
            mine = Registry.connect(store_env.settings)  # one connection per uploader, like separate processes
            barrier.wait()
            _register(mine, i=i)
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = registry.versions("u1", "default")
    assert sorted(r.sha256 for r in versions) == [_sha(i) for i in range(1, 9)]
    assert [r.version for r in versions] == list(range(1, 9))
    # Each registration bumps the version and moves the alias in one script, so the last one wins.
    assert registry.tenant("u1").alias == AdapterRef("u1", "default", 8)


def test_redis_keys_follow_the_documented_layout(registry, store_env):
    """Every key a full workflow leaves behind matches a pattern in registry.py's docstring."""
    registry.create_tenant("u1", new_api_key()[1])
    _register(registry, i=1)
    _register(registry, i=2)
    registry.rollback("u1")
    registry.delete_version("u1", "default", 2)
    _register(registry, "u1", "other", i=3)
    documented = re.findall(r"^  (P:\S+)", registry_module.__doc__, re.MULTILINE)
    patterns = [re.compile(re.escape(p).replace("P", "flora", 1).replace(r"\{", "{").replace(r"\}", "}")
                           .replace("{sha256}", "[0-9a-f]{64}").replace("{t}", "[^:]+").replace("{a}", "[^:]+").replace("{v}", r"\d+") + "$")
                for p in documented]  # fmt: skip
    keys = store_env.redis_keys()
    assert len(documented) == 10 and len(keys) >= 9
    assert [k for k in keys if not any(p.match(k) for p in patterns)] == []


def test_docs_show_the_same_key_layout():
    """docs/adapterctl.md repeats the layout for readers; it must not drift from the code's."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "adapterctl.md").read_text()
    in_code = re.findall(r"^  (P:\S+ +\S+)", registry_module.__doc__, re.MULTILINE)
    in_docs = re.findall(r"^(P:\S+ +\S+)", docs, re.MULTILINE)
    assert in_docs == in_code and len(in_code) == 10
