"""The adapter registry in Redis: tenants, adapters, versions, aliases, change notices.

Key layout (P is the key prefix, "flora" by default; all values are strings):

  P:tenants                        SET     every tenant id
  P:tenant:{t}                     HASH    key_sha256, created_at, alias ("" or "{adapter}@{version}"),
                                           requests_per_minute, tokens_per_minute, max_concurrent (0: unlimited)
  P:tenant:{t}:history             LIST    earlier alias values, newest first (rollback pops; 50 kept)
  P:tenant:{t}:adapters            SET     the tenant's adapter names with at least one live version
  P:apikey:{sha256}                STRING  tenant id, for authenticating a key by its hash
  P:adapter:{t}:{a}:seq            STRING  last version number handed out (versions are never reused)
  P:adapter:{t}:{a}:versions       ZSET    live version numbers (member = score = version)
  P:version:{t}:{a}:{v}            HASH    kind, rank, targets (JSON list), base_model, alpha ("" unless lora),
                                           sha256, size, blob_uri, created_at, status ("ready" | "deleted"),
                                           released_at (when the alias last left it), deleted_at
  P:blob:{sha256}                  SET     "{t}/{a}@{v}" of every live version stored in that blob
  P:blob:{sha256}:deleting         STRING  present while that blob is being deleted (expires after 5 min)

Times are Unix seconds. Every change is one Lua script, so it is atomic (Redis
runs a script alone) and its notice is published in the same step, on the
channel (default "flora:changed"), as a small JSON object:

  {"event": "tenant_created" | "key_rotated" | "quota_changed" | "version_added"
            | "alias_moved" | "version_deleted" | "tenant_deleted",
   "tenant": "user42", "adapter": "default", "version": 3, "from": "default@2", "at": 1700000000.0}

("adapter", "version", "from" only where they apply.) Scripts check everything
before their first write, because Redis does not roll a script back on error.
Scripts compute key names, so this needs a single Redis primary, not Redis Cluster.

Deleting a tenant announces each of its live versions as "version_deleted", then
"tenant_deleted". It removes every key of the tenant but its version hashes (kept and
marked deleted, as any deleted version's) and its adapters' seq counters: a tenant
created again under the same name continues the numbering, so a reference such as
user42/default@1 never names two different adapters (caches keyed by one stay right).
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.engine.adapter_format import AdapterKind, AdapterSpec

from adapters_store.errors import ConflictError, NotFoundError, RegistryUnavailable, StoreError
from adapters_store.names import AdapterRef
from adapters_store.settings import Settings

HISTORY = 50
BLOB_DELETE_TTL_S = 300


class BlobBusy(ConflictError):
    """The blob an upload wants to reference is being deleted right now; retry the upload."""


@dataclass(frozen=True)
class Quota:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0
    max_concurrent: int = 0


@dataclass(frozen=True)
class TenantRecord:
    tenant: str
    key_sha256: str
    alias: AdapterRef | None  # the current adapter version, None before the first upload/assign
    quota: Quota
    created_at: float

    def to_json(self) -> dict:
        return {"tenant": self.tenant, "current": str(self.alias) if self.alias else None, "quota": asdict(self.quota),
                "created_at": self.created_at, "key_sha256_prefix": self.key_sha256[:12]}  # fmt: skip


@dataclass(frozen=True)
class VersionRecord:
    tenant: str
    name: str
    version: int
    spec: AdapterSpec
    sha256: str
    size: int
    blob_uri: str
    created_at: float
    status: str  # "ready" | "deleted"
    released_at: float | None

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.version)

    def to_json(self) -> dict:
        spec = self.spec
        return {"ref": str(self.ref), "tenant": self.tenant, "adapter": self.name, "version": self.version,
                "kind": spec.kind.value, "rank": spec.rank, "targets": list(spec.targets), "base_model": spec.base_model,
                "alpha": spec.alpha, "sha256": self.sha256, "size": self.size, "blob_uri": self.blob_uri,
                "created_at": self.created_at, "status": self.status}  # fmt: skip


@dataclass(frozen=True)
class Registration:
    version: VersionRecord
    added: bool  # False: identical bytes were already the newest version (idempotent re-upload)
    tenant_created: bool
    alias_moved: bool


# ---- Lua ---------------------------------------------------------------------------------------
# ARGV[1..3] of every script: key prefix, channel, now.

_PRELUDE = """
local p, ch, now = ARGV[1], ARGV[2], ARGV[3]
local function fail(code, msg) error({err = code .. ' ' .. msg}) end
local function tenant_key(t) return p .. ':tenant:' .. t end
local function versions_key(t, a) return p .. ':adapter:' .. t .. ':' .. a .. ':versions' end
local function version_key(t, a, v) return p .. ':version:' .. t .. ':' .. a .. ':' .. v end
local function publish(event, t, a, v, from)
  local msg = {event = event, tenant = t, adapter = a, version = tonumber(v), from = from, at = tonumber(now)}
  redis.call('PUBLISH', ch, cjson.encode(msg))
end
local function need_tenant(t)
  if redis.call('EXISTS', tenant_key(t)) == 0 then fail('NOT_FOUND', 'tenant ' .. t .. ' does not exist') end
end
local function create_tenant(t, key_hash, rpm, tpm, conc)
  redis.call('HSET', tenant_key(t), 'key_sha256', key_hash, 'created_at', now, 'alias', '',
             'requests_per_minute', rpm, 'tokens_per_minute', tpm, 'max_concurrent', conc)
  redis.call('SADD', p .. ':tenants', t)
  redis.call('SET', p .. ':apikey:' .. key_hash, t)
  publish('tenant_created', t)
end
local function move_alias(t, target, remember)
  local tkey = tenant_key(t)
  local current = redis.call('HGET', tkey, 'alias')
  if current == target then return 0 end
  if current and current ~= '' then
    if remember then
      redis.call('LPUSH', tkey .. ':history', current)
      redis.call('LTRIM', tkey .. ':history', 0, %(history)d - 1)
    end
    local a, v = string.match(current, '^(.+)@(%%d+)$')
    redis.call('HSET', version_key(t, a, v), 'released_at', now)
  end
  redis.call('HSET', tkey, 'alias', target)
  local a, v = string.match(target, '^(.+)@(%%d+)$')
  publish('alias_moved', t, a, v, current ~= '' and current or nil)
  return 1
end
-- Mark a live version deleted; its blob, if no live version uses it any more, is flagged as being
-- deleted (uploads of the same bytes wait) and reported orphaned: the caller deletes it.
local function delete_version(t, a, v)
  local vs, vkey, ref = versions_key(t, a), version_key(t, a, v), a .. '@' .. v
  local sha = redis.call('HGET', vkey, 'sha256')
  redis.call('HSET', vkey, 'status', 'deleted', 'deleted_at', now)
  redis.call('ZREM', vs, v)
  redis.call('LREM', tenant_key(t) .. ':history', 0, ref)
  if redis.call('ZCARD', vs) == 0 then redis.call('SREM', tenant_key(t) .. ':adapters', a) end
  local refs = p .. ':blob:' .. sha
  redis.call('SREM', refs, t .. '/' .. ref)
  local orphaned = 0
  if redis.call('SCARD', refs) == 0 then
    redis.call('SET', refs .. ':deleting', now, 'EX', %(ttl)d)
    orphaned = 1
  end
  publish('version_deleted', t, a, v)
  return {orphaned, sha}
end
""" % {"history": HISTORY, "ttl": BLOB_DELETE_TTL_S}

# ARGV: ... tenant, key_hash, requests_per_minute, tokens_per_minute, max_concurrent
_CREATE_TENANT = """
local t = ARGV[4]
if redis.call('EXISTS', tenant_key(t)) == 1 then fail('CONFLICT', 'tenant ' .. t .. ' already exists') end
create_tenant(t, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""

# ARGV: ... tenant, new key hash
_ROTATE_KEY = """
local t = ARGV[4]
need_tenant(t)
local old = redis.call('HGET', tenant_key(t), 'key_sha256')
if old then redis.call('DEL', p .. ':apikey:' .. old) end
redis.call('SET', p .. ':apikey:' .. ARGV[5], t)
redis.call('HSET', tenant_key(t), 'key_sha256', ARGV[5], 'key_rotated_at', now)
publish('key_rotated', t)
return 1
"""

# ARGV: ... tenant, field, value, field, value, ...
_SET_QUOTA = """
local t = ARGV[4]
need_tenant(t)
for i = 5, #ARGV, 2 do redis.call('HSET', tenant_key(t), ARGV[i], ARGV[i + 1]) end
publish('quota_changed', t)
return 1
"""

# ARGV: ... tenant, adapter, new-tenant key hash ("" = tenant must exist), sha256, size, blob_uri,
#       kind, rank, targets, base_model, alpha, assign ("1" | "0")
_REGISTER = """
local t, a, key_hash, sha = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if key_hash == '' then need_tenant(t) end
if redis.call('EXISTS', p .. ':blob:' .. sha .. ':deleting') == 1 then
  fail('BLOB_BUSY', 'blob ' .. sha .. ' is being deleted right now')
end
local tenant_created = 0
if redis.call('EXISTS', tenant_key(t)) == 0 then
  create_tenant(t, key_hash, '0', '0', '0')
  tenant_created = 1
end
local vs = versions_key(t, a)
local version = redis.call('ZRANGE', vs, -1, -1)[1]
local added = 0
if not (version and redis.call('HGET', version_key(t, a, version), 'sha256') == sha) then
  version = redis.call('INCR', p .. ':adapter:' .. t .. ':' .. a .. ':seq')
  redis.call('HSET', version_key(t, a, version), 'kind', ARGV[10], 'rank', ARGV[11], 'targets', ARGV[12],
             'base_model', ARGV[13], 'alpha', ARGV[14], 'sha256', sha, 'size', ARGV[8], 'blob_uri', ARGV[9],
             'created_at', now, 'status', 'ready')
  redis.call('ZADD', vs, version, version)
  redis.call('SADD', tenant_key(t) .. ':adapters', a)
  redis.call('SADD', p .. ':blob:' .. sha, t .. '/' .. a .. '@' .. version)
  publish('version_added', t, a, version)
  added = 1
end
local moved = 0
if ARGV[15] == '1' then moved = move_alias(t, a .. '@' .. version, true) end
return {tonumber(version), added, tenant_created, moved}
"""

# ARGV: ... tenant, adapter, version ("" = newest live)
_ASSIGN = """
local t, a, v = ARGV[4], ARGV[5], ARGV[6]
need_tenant(t)
local vs = versions_key(t, a)
if v == '' then
  v = redis.call('ZRANGE', vs, -1, -1)[1]
  if not v then fail('NOT_FOUND', 'adapter ' .. t .. '/' .. a .. ' has no live versions') end
elseif not redis.call('ZSCORE', vs, v) then
  fail('NOT_FOUND', 'version ' .. t .. '/' .. a .. '@' .. v .. ' does not exist or was deleted')
end
return {tonumber(v), move_alias(t, a .. '@' .. v, true)}
"""

# ARGV: ... tenant, version to go back to ("" = the previous alias)
_ROLLBACK = """
local t, to = ARGV[4], ARGV[5]
need_tenant(t)
local current = redis.call('HGET', tenant_key(t), 'alias')
if not current or current == '' then fail('CONFLICT', 'tenant ' .. t .. ' has no current adapter to roll back from') end
local a, cv = string.match(current, '^(.+)@(%d+)$')
local target
if to ~= '' then
  if tonumber(to) >= tonumber(cv) then
    fail('CONFLICT', 'rollback goes to an earlier version: ' .. t .. ' is on ' .. current .. ', asked for version ' .. to)
  end
  if not redis.call('ZSCORE', versions_key(t, a), to) then
    fail('NOT_FOUND', 'version ' .. t .. '/' .. a .. '@' .. to .. ' does not exist or was deleted')
  end
  target = a .. '@' .. to
else
  target = redis.call('LINDEX', tenant_key(t) .. ':history', 0)
  if target then
    redis.call('LPOP', tenant_key(t) .. ':history')
  else
    local below = redis.call('ZREVRANGEBYSCORE', versions_key(t, a), '(' .. cv, '-inf', 'LIMIT', 0, 1)[1]
    if not below then fail('CONFLICT', 'nothing to roll back to: ' .. t .. ' is on ' .. current .. ', its oldest live version') end
    target = a .. '@' .. below
  end
end
move_alias(t, target, false)
return target
"""

# ARGV: ... tenant, adapter, version, grace seconds, force ("1" | "0")
_DELETE = """
local t, a, v, grace, force = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
local vs, vkey, ref = versions_key(t, a), version_key(t, a, v), a .. '@' .. v
if not redis.call('ZSCORE', vs, v) then fail('NOT_FOUND', 'version ' .. t .. '/' .. ref .. ' does not exist or was deleted') end
if redis.call('HGET', tenant_key(t), 'alias') == ref then
  fail('CONFLICT', t .. '/' .. ref .. ' is the current adapter of tenant ' .. t .. ': assign another version or roll back first')
end
local released = tonumber(redis.call('HGET', vkey, 'released_at') or '')
if released and not force and tonumber(now) - released < grace then
  fail('CONFLICT', t .. '/' .. ref .. ' was the current adapter ' .. math.floor(tonumber(now) - released) ..
       ' s ago and in-flight requests may still use it: retry after ' .. grace .. ' s or pass --force')
end
return delete_version(t, a, v)
"""

# ARGV: ... tenant, force ("1" | "0"). Returns {adapter, version, orphaned, sha256} per deleted version.
_DELETE_TENANT = """
local t, force = ARGV[4], ARGV[5] == '1'
need_tenant(t)
local tkey = tenant_key(t)
local adapters = redis.call('SMEMBERS', tkey .. ':adapters')
table.sort(adapters)  -- a set's order is arbitrary; notices and the reply should not be
local live = {}
for _, a in ipairs(adapters) do
  for _, v in ipairs(redis.call('ZRANGE', versions_key(t, a), 0, -1)) do table.insert(live, {a, v}) end
end
if #live > 0 and not force then
  fail('CONFLICT', 'tenant ' .. t .. ' has ' .. #live .. ' live adapter version(s): pass --force to delete them with the tenant')
end
local deleted = {}
for _, av in ipairs(live) do
  local a, v = av[1], av[2]
  local result = delete_version(t, a, v)  -- {orphaned, sha256}
  table.insert(deleted, {a, tonumber(v), result[1], result[2]})
end
local key_hash = redis.call('HGET', tkey, 'key_sha256')
redis.call('DEL', tkey, tkey .. ':history', tkey .. ':adapters', p .. ':apikey:' .. key_hash)
redis.call('SREM', p .. ':tenants', t)
publish('tenant_deleted', t)
return deleted
"""


_SCRIPT_LOCATION = re.compile(r"\s*script: [0-9a-f]+, on @user_script:\d+\.?$")


def _translated(method: Callable) -> Callable:
    """Redis exceptions -> the store's, naming the server (without its password)."""

    @functools.wraps(method)
    def wrapper(self: "Registry", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except redis.exceptions.ResponseError as e:
            raise _script_error(str(e), self.where) from e
        except redis.exceptions.RedisError as e:
            raise RegistryUnavailable(f"cannot reach Redis at {self.where}: {e}") from e

    return wrapper


def _script_error(message: str, where: str) -> StoreError:
    # Redis appends where in the script the error was raised; users need only the reason.
    code, _, text = _SCRIPT_LOCATION.sub("", message).partition(" ")
    match code:
        case "NOT_FOUND":
            return NotFoundError(text)
        case "CONFLICT":
            return ConflictError(text)
        case "BLOB_BUSY":
            return BlobBusy(text)
    return RegistryUnavailable(f"Redis at {where} refused the change: {message}")


class Registry:
    def __init__(self, client: redis.Redis, where: str, prefix: str = "flora", channel: str = "flora:changed",
                 delete_grace_s: float = 60.0):  # fmt: skip
        self.client, self.where, self.prefix, self.channel = client, where, prefix, channel
        self.delete_grace_s = delete_grace_s
        scripts = {"create_tenant": _CREATE_TENANT, "rotate_key": _ROTATE_KEY, "set_quota": _SET_QUOTA,
                   "register": _REGISTER, "assign": _ASSIGN, "rollback": _ROLLBACK, "delete": _DELETE,
                   "delete_tenant": _DELETE_TENANT}  # fmt: skip
        self._scripts = {name: client.register_script(_PRELUDE + body) for name, body in scripts.items()}

    @staticmethod
    def connect(settings: Settings) -> "Registry":
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            # No automatic retries: a script whose reply was lost may already have run, and some
            # (rollback, delete) must not run twice. The caller gets a clear error and decides.
            retry=Retry(NoBackoff(), retries=0),
        )
        return Registry(client, _safe_url(settings.redis_url), settings.key_prefix, settings.channel, settings.delete_grace_s)

    def _run(self, script: str, *args: object) -> object:
        return self._scripts[script](keys=[], args=[self.prefix, self.channel, repr(time.time()), *args])

    def _key(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    @_translated
    def ping(self) -> None:
        self.client.ping()

    # ---- tenants ----

    @_translated
    def create_tenant(self, tenant: str, key_sha256: str, quota: Quota = Quota()) -> None:
        self._run("create_tenant", tenant, key_sha256, quota.requests_per_minute, quota.tokens_per_minute, quota.max_concurrent)

    @_translated
    def tenant(self, tenant: str) -> TenantRecord:
        raw = self.client.hgetall(self._key("tenant", tenant))
        if not raw:
            raise NotFoundError(f"tenant {tenant} does not exist")
        name, _, version = raw.get("alias", "").partition("@")
        quota = Quota(*(int(raw.get(f, 0)) for f in ("requests_per_minute", "tokens_per_minute", "max_concurrent")))
        alias = AdapterRef(tenant, name, int(version)) if name else None
        return TenantRecord(tenant, raw["key_sha256"], alias, quota, float(raw["created_at"]))

    @_translated
    def tenants(self) -> list[str]:
        return sorted(self.client.smembers(self._key("tenants")))

    @_translated
    def tenant_for_key(self, key_sha256: str) -> str | None:
        return self.client.get(self._key("apikey", key_sha256))

    @_translated
    def rotate_key(self, tenant: str, key_sha256: str) -> None:
        self._run("rotate_key", tenant, key_sha256)

    @_translated
    def delete_tenant(self, tenant: str, force: bool = False) -> list[tuple[AdapterRef, str, bool]]:
        """Remove the tenant, its API key and alias history; refused while it has live versions
        unless `force`, which deletes them as `delete_version` does (no grace period: the tenant is gone).
        Returns (version, sha256, orphaned) per version deleted; the caller deletes each orphaned
        blob, then calls `finish_blob_delete`."""
        rows = self._run("delete_tenant", tenant, int(force))
        return [(AdapterRef(tenant, name, int(v)), sha, bool(orphaned)) for name, v, orphaned, sha in rows]

    @_translated
    def set_quota(self, tenant: str, changes: dict[str, int]) -> None:
        unknown = set(changes) - set(Quota.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quota fields {sorted(unknown)}")
        self._run("set_quota", tenant, *(x for item in sorted(changes.items()) for x in item))

    # ---- adapters and versions ----

    @_translated
    def register(self, tenant: str, name: str, spec: AdapterSpec, sha256: str, size: int, blob_uri: str,
                 assign: bool = True, new_tenant_key_sha256: str = "") -> Registration:  # fmt: skip
        """Record a new version whose blob is already stored (and move the alias to it, if `assign`).
        With `new_tenant_key_sha256`, a missing tenant is created with that key."""
        version, added, created, moved = self._run(
            "register", tenant, name, new_tenant_key_sha256, sha256, size, blob_uri, spec.kind.value, spec.rank,
            json.dumps(list(spec.targets)), spec.base_model, "" if spec.alpha is None else repr(spec.alpha), int(assign),
        )  # fmt: skip
        return Registration(self.version(tenant, name, version), bool(added), bool(created), bool(moved))

    @_translated
    def version(self, tenant: str, name: str, version: int) -> VersionRecord:
        raw = self.client.hgetall(self._key("version", tenant, name, version))
        if not raw:
            raise NotFoundError(f"version {tenant}/{name}@{version} does not exist")
        return _version_record(tenant, name, version, raw)

    @_translated
    def versions(self, tenant: str, name: str) -> list[VersionRecord]:
        """Every version ever recorded, deleted ones included, oldest first."""
        last = int(self.client.get(self._key("adapter", tenant, name, "seq")) or 0)
        pipe = self.client.pipeline(transaction=False)
        for v in range(1, last + 1):
            pipe.hgetall(self._key("version", tenant, name, v))
        return [_version_record(tenant, name, v, raw) for v, raw in enumerate(pipe.execute(), 1) if raw]

    @_translated
    def adapters(self, tenant: str) -> list[str]:
        return sorted(self.client.smembers(self._key("tenant", tenant, "adapters")))

    @_translated
    def newest(self, tenant: str, name: str) -> int:
        newest = self.client.zrange(self._key("adapter", tenant, name, "versions"), -1, -1)
        if not newest:
            raise NotFoundError(f"adapter {tenant}/{name} has no live versions")
        return int(newest[0])

    def resolve(self, ref: AdapterRef) -> VersionRecord:
        """The version a reference means: the alias, the newest live version, or the one named."""
        if ref.name is None:
            alias = self.tenant(ref.tenant).alias
            if alias is None:
                raise NotFoundError(f"tenant {ref.tenant} has no current adapter")
            ref = alias
        version = ref.version if ref.version is not None else self.newest(ref.tenant, ref.name)
        return self.version(ref.tenant, ref.name, version)

    @_translated
    def assign(self, tenant: str, name: str, version: int | None = None) -> tuple[AdapterRef, bool]:
        """Move the tenant's alias in one step; (the version it now points at, whether it moved)."""
        v, moved = self._run("assign", tenant, name, "" if version is None else version)
        return AdapterRef(tenant, name, int(v)), bool(moved)

    @_translated
    def rollback(self, tenant: str, to_version: int | None = None) -> AdapterRef:
        """Back to the previous alias (or, with `to_version`, an earlier version of the current adapter)."""
        target = self._run("rollback", tenant, "" if to_version is None else to_version)
        name, _, version = target.partition("@")
        return AdapterRef(tenant, name, int(version))

    @_translated
    def delete_version(self, tenant: str, name: str, version: int, force: bool = False) -> tuple[str, bool]:
        """Mark a version deleted; refused while it is a current alias or was one within the grace period.
        Returns (sha256, whether no live version uses that blob any more: the caller deletes it,
        then calls `finish_blob_delete`)."""
        orphaned, sha = self._run("delete", tenant, name, version, self.delete_grace_s, int(force))
        return sha, bool(orphaned)

    @_translated
    def blob_deleting(self, sha256: str) -> bool:
        return bool(self.client.exists(self._key("blob", sha256, "deleting")))

    @_translated
    def finish_blob_delete(self, sha256: str) -> None:
        self.client.delete(self._key("blob", sha256, "deleting"))

    @_translated
    def blob_refs(self, sha256: str) -> set[str]:
        return self.client.smembers(self._key("blob", sha256))

    @_translated
    def subscribe(self) -> redis.client.PubSub:
        """Change notices (JSON, see the module docstring) via `pubsub.get_message()`."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        # Read Redis's confirmation, so that every change published after this returns is seen.
        pubsub.get_message(timeout=5.0)
        return pubsub


def _version_record(tenant: str, name: str, version: int, raw: dict[str, str]) -> VersionRecord:
    alpha = float(raw["alpha"]) if raw.get("alpha") else None
    spec = AdapterSpec(AdapterKind(raw["kind"]), int(raw["rank"]), tuple(json.loads(raw["targets"])), raw["base_model"], alpha)
    released = float(raw["released_at"]) if raw.get("released_at") else None
    return VersionRecord(tenant, name, int(version), spec, raw["sha256"], int(raw["size"]), raw["blob_uri"],
                         float(raw["created_at"]), raw["status"], released)  # fmt: skip


def _safe_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        parsed = parsed._replace(netloc=f"{parsed.username or ''}:***@{parsed.hostname}:{parsed.port}")
    return parsed.geturl()
