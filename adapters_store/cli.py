"""adapterctl: validate, upload and manage tenants' adapters (docs/adapterctl.md)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from adapters_store.errors import ConflictError, StoreError, UsageError
from adapters_store.names import AdapterRef, check_name
from adapters_store.registry import Quota, VersionRecord
from adapters_store.render import Output, size, table, tenant_text, version_text
from adapters_store.settings import Settings
from adapters_store.store import AdapterStore, DeleteResult, UploadResult, default_tenant, prepare
from adapters_store.validation import BaseModel

DESCRIPTION = """\
Validate, upload and manage the adapters (FLoRA, LoRA, IA3) that tenants run on
the gateway's shared base model. Adapters are stored as content-addressed blobs
(S3 or a local directory) and registered in Redis; routers and workers follow
the registry's changes live.

A REF names what a command acts on:
  TENANT                  the tenant's current adapter
  TENANT/ADAPTER          the newest version of one of its adapters
  TENANT/ADAPTER@VERSION  one version"""

EPILOG = """\
configuration: every option above also comes from the environment
(FLORA_REDIS_URL, FLORA_BLOB_URL, FLORA_S3_ENDPOINT_URL, FLORA_S3_REGION,
FLORA_S3_ACCESS_KEY_ID, FLORA_S3_SECRET_ACCESS_KEY, FLORA_BASE_MODEL,
FLORA_BASE_MODEL_CONFIG, FLORA_MAX_RANK); options win.

exit codes: 0 ok, 2 bad usage or name, 3 invalid adapter, 4 not found,
5 conflict (exists, still referenced), 6 Redis or blob store unavailable,
7 stored blob corrupt, 130 interrupted.

example:
  adapterctl tenant create user42
  adapterctl upload user42.safetensors          # tenant user42, adapter "default"
  adapterctl rollback user42                    # back to the previous version"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already explained
        return int(e.code or 0)
    out = Output(as_json=getattr(args, "json", False), progress_bars=False if getattr(args, "no_progress", False) else None)
    try:
        return args.handler(args, out)
    except StoreError as e:
        out.error(e)
        return e.exit_code
    except KeyboardInterrupt:
        out.note("adapterctl: interrupted")
        return 130


# ---- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(hidden=True)
    parser = argparse.ArgumentParser(
        prog="adapterctl", description=DESCRIPTION, epilog=EPILOG, parents=[_common_options(hidden=False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add = _adder(commands, common)

    p = add("upload", cmd_upload, "validate and store an adapter file or PEFT directory as a new version",
            "Validate FILE (a .safetensors adapter) or DIR (a PEFT LoRA/IA3 directory), store it and make it\n"
            "the tenant's current adapter. All or nothing: on any error nothing is registered. Uploading the\n"
            "bytes of the adapter's newest version again changes nothing. A tenant that does not exist yet\n"
            "is created, and its API key printed once.")  # fmt: skip
    p.add_argument("source", type=Path, metavar="FILE|DIR", help="a .safetensors adapter or a PEFT adapter directory")
    p.add_argument("--tenant", help="owner (default: the file name's stem, user42.safetensors -> user42)")
    p.add_argument("--name", default="default", help="adapter name within the tenant (default: %(default)s)")
    p.add_argument("--base-model", metavar="ID", help="base model id of a PEFT directory whose config names a path")
    p.add_argument("--no-assign", dest="assign", action="store_false", help="store the version, keep the current alias")

    p = add("validate", cmd_validate, "check an adapter file or PEFT directory without storing it",
            "Run every check an upload runs (format, base model, modules, shapes, rank, dtypes, values)\n"
            "and report each problem. Needs only the base model's config, no Redis or blob store.")  # fmt: skip
    p.add_argument("source", type=Path, metavar="FILE|DIR", help="a .safetensors adapter or a PEFT adapter directory")
    p.add_argument("--base-model", metavar="ID", help="base model id of a PEFT directory whose config names a path")

    p = add("list", cmd_list, "list tenants, or one tenant's adapter versions")
    p.add_argument("tenant", nargs="?", metavar="TENANT", help="show this tenant's versions (default: every tenant)")

    p = add("show", cmd_show, "show one adapter version's details")
    p.add_argument("ref", type=_ref, metavar="REF", help="TENANT, TENANT/ADAPTER or TENANT/ADAPTER@VERSION")

    p = add("assign", cmd_assign, "make a version the tenant's current adapter (one atomic step)")
    p.add_argument("ref", type=_ref, metavar="TENANT/ADAPTER[@VERSION]", help="the version (default: the newest)")

    p = add("rollback", cmd_rollback, "move a tenant back to its previous adapter version",
            "Move the alias back to where it was before the last upload or assign (or, with --to,\n"
            "to an earlier version of the current adapter). In-flight requests finish on the old version.")  # fmt: skip
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    p.add_argument("--to", type=int, metavar="VERSION", help="an earlier version of the current adapter")

    p = add("delete", cmd_delete, "delete one version or all versions of an adapter",
            "Refused while the version is a tenant's current adapter, or was one within the last\n"
            "FLORA_DELETE_GRACE_S seconds (requests may still run on it) unless --force. The blob is\n"
            "removed once no live version uses it.")  # fmt: skip
    p.add_argument("ref", type=_ref, metavar="TENANT/ADAPTER[@VERSION]", help="one version, or without @VERSION every version")
    p.add_argument("--force", action="store_true", help="skip the grace period (never deletes a current adapter)")

    p = add("download", cmd_download, "download a version's file (sha256 verified)")
    p.add_argument("ref", type=_ref, metavar="REF", help="TENANT, TENANT/ADAPTER or TENANT/ADAPTER@VERSION")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: TENANT-ADAPTER-vVERSION.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")

    _tenant_commands(add("tenant", None, "create and manage tenants"), common)
    return parser


def _tenant_commands(tenant: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    add = _adder(tenant.add_subparsers(title="tenant commands", metavar="COMMAND", required=True), common)
    p = add("create", cmd_tenant_create, "create a tenant and print its API key (shown once)")
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    _quota_options(p)
    p = add("show", cmd_tenant_show, "show a tenant's current adapter, adapters and quota")
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    p = add("rotate-key", cmd_tenant_rotate_key, "replace a tenant's API key (the old one stops working at once)")
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    p = add("set-quota", cmd_tenant_set_quota, "change a tenant's quota (0 = unlimited; omitted = unchanged)")
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    _quota_options(p)
    p = add("delete", cmd_tenant_delete, "delete a tenant and its API key",
            "Refused while the tenant has live adapter versions, unless --force: then they are deleted\n"
            "as `adapterctl delete` deletes them, and their blobs once no live version uses them. The\n"
            "tenant's API key stops working at once. A tenant created again under the same name gets a\n"
            "new key and continues the old version numbers.")  # fmt: skip
    p.add_argument("tenant", metavar="TENANT", help="tenant name")
    p.add_argument("--force", action="store_true", help="delete its live adapter versions too, the current one included")


def _adder(commands, common: argparse.ArgumentParser):
    def add(name: str, handler, summary: str, details: str | None = None) -> argparse.ArgumentParser:
        description = f"{summary[0].upper()}{summary[1:]}.\n\n{details or ''}".rstrip()
        p = commands.add_parser(name, help=summary, description=description, epilog=_SUB_EPILOG, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    return add


_SUB_EPILOG = "Common options (--json, --no-progress, --redis-url, --blob-url, ...): see `adapterctl --help`."


def _common_options(hidden: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name. `hidden` keeps them out of the
    subcommands' help, which then shows only what is particular to each command."""
    # SUPPRESS keeps an option given before the command from being reset by the subcommand's parser.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)

    def group(title: str):
        g = common.add_argument_group(title)
        return lambda *flags, help=None, **kw: g.add_argument(*flags, help=argparse.SUPPRESS if hidden else help, **kw)

    out = group("output")
    out("--json", action="store_true", help="print results as JSON (for scripts)")
    out("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    conn = group("store (default: environment, see below)")
    conn("--redis-url", metavar="URL", help="registry, e.g. redis://127.0.0.1:6379/0")
    conn("--blob-url", metavar="URL", help="s3://BUCKET[/PREFIX], file:///DIR or a directory")
    conn("--s3-endpoint-url", metavar="URL", help="S3 API endpoint (MinIO, moto); default AWS")
    conn("--s3-region", metavar="REGION", help="S3 region")
    conn("--s3-access-key-id", metavar="ID", help="S3 credentials (default: boto3's chain)")
    conn("--s3-secret-access-key", metavar="SECRET", help="prefer the environment: options show in `ps`")
    model = group("deployment's base model (what uploads are validated against)")
    model("--model-id", metavar="ID", help="base model id adapters must declare")
    model("--model-config", type=Path, metavar="PATH", help="its config.json or model directory")
    model("--max-rank", type=int, metavar="N", help="highest rank accepted")
    return common


def _quota_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests-per-minute", type=_non_negative, metavar="N", help="requests per minute (0: unlimited)")
    p.add_argument("--tokens-per-minute", type=_non_negative, metavar="N", help="generated tokens per minute (0: unlimited)")
    p.add_argument("--max-concurrent", type=_non_negative, metavar="N", help="requests in flight at once (0: unlimited)")


def _ref(text: str) -> AdapterRef:
    try:
        return AdapterRef.parse(text)
    except UsageError as e:  # argparse reports ArgumentTypeError as a usage error (exit 2)
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


# ---- configuration -----------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    base = Settings.from_env()

    def opt(name: str, default):
        return getattr(args, name, None) or default

    s3 = replace(base.s3, endpoint_url=opt("s3_endpoint_url", base.s3.endpoint_url), region=opt("s3_region", base.s3.region),
                 access_key_id=opt("s3_access_key_id", base.s3.access_key_id),
                 secret_access_key=opt("s3_secret_access_key", base.s3.secret_access_key))  # fmt: skip
    limits = replace(base.limits, max_rank=opt("max_rank", base.limits.max_rank))
    return replace(base, redis_url=opt("redis_url", base.redis_url), blob_url=opt("blob_url", base.blob_url), s3=s3,
                   base_model=opt("model_id", base.base_model), base_model_config=opt("model_config", base.base_model_config),
                   limits=limits)  # fmt: skip


def _store(args: argparse.Namespace) -> AdapterStore:
    return AdapterStore.open(settings_from(args))


# ---- commands ----------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace, out: Output) -> int:
    store = _store(args)
    tenant = check_name(args.tenant) if args.tenant else default_tenant(args.source)
    adapter = store.prepare(args.source, args.base_model)
    with out.progress(f"upload {tenant}", adapter.size) as progress:
        result = store.upload(adapter, tenant, args.name, args.assign, progress)
    reg = result.registration
    data = {"version": reg.version.to_json(), "added": reg.added, "blob_reused": result.blob_reused,
            "alias_moved": reg.alias_moved, "tenant_created": reg.tenant_created, "api_key": result.api_key}  # fmt: skip
    out.result(data, _upload_text(result))
    return 0


def _upload_text(result: UploadResult) -> str:
    reg, spec = result.registration, result.registration.version.spec
    verb = "stored" if reg.added else "unchanged: identical to"
    lines = [f"{verb} {reg.version.ref} ({spec.kind.value}, rank {spec.rank}, {len(spec.targets)} modules, "
             f"{size(reg.version.size)}, sha256 {reg.version.sha256[:12]})"]  # fmt: skip
    if reg.alias_moved:
        lines.append(f"tenant {reg.version.tenant} now uses {reg.version.ref}")
    if result.api_key:
        lines += [f"created tenant {reg.version.tenant}; its API key (shown once, store it now):", f"  {result.api_key}"]
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    settings = settings_from(args)
    adapter = prepare(args.source, BaseModel.from_config(settings.base_model, settings.base_model_config),
                      settings.limits, args.base_model)  # fmt: skip
    spec = adapter.spec
    data = {"valid": True, "kind": spec.kind.value, "rank": spec.rank, "targets": list(spec.targets),
            "base_model": spec.base_model, "alpha": spec.alpha, "size": adapter.size, "sha256": adapter.sha256}  # fmt: skip
    out.result(data, f"{args.source}: ok: {spec.kind.value} adapter, rank {spec.rank}, {len(spec.targets)} modules, "
                     f"base model {spec.base_model}, {size(adapter.size)}, sha256 {adapter.sha256[:12]}")  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    registry = _store(args).registry
    if args.tenant is None:
        tenants = [registry.tenant(t) for t in registry.tenants()]
        rows = [[t.tenant, t.alias or "-", len(registry.adapters(t.tenant))] for t in tenants]
        out.result([t.to_json() for t in tenants], table(["TENANT", "CURRENT", "ADAPTERS"], rows))
        return 0
    tenant = registry.tenant(check_name(args.tenant))
    records = [r for name in registry.adapters(tenant.tenant) for r in registry.versions(tenant.tenant, name)]
    rows = [_version_row(r, r.ref == tenant.alias) for r in records]
    out.result([r.to_json() for r in records], table(["VERSION", "KIND", "RANK", "SIZE", "STATUS", "CURRENT"], rows))
    return 0


def _version_row(r: VersionRecord, current: bool) -> list:
    return [r.ref, r.spec.kind.value, r.spec.rank, size(r.size), r.status, "*" if current else ""]


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    registry = _store(args).registry
    record = registry.resolve(args.ref)
    current = registry.tenant(record.tenant).alias == record.ref
    out.result({**record.to_json(), "current": current}, version_text(record, current))
    return 0


def cmd_assign(args: argparse.Namespace, out: Output) -> int:
    if args.ref.name is None:
        raise UsageError(f"assign needs TENANT/ADAPTER[@VERSION], got {args.ref}")
    target, moved = _store(args).registry.assign(args.ref.tenant, args.ref.name, args.ref.version)
    text = f"tenant {target.tenant} now uses {target}" if moved else f"tenant {target.tenant} already uses {target}"
    out.result({"current": str(target), "moved": moved}, text)
    return 0


def cmd_rollback(args: argparse.Namespace, out: Output) -> int:
    target = _store(args).registry.rollback(check_name(args.tenant), args.to)
    out.result({"current": str(target)}, f"tenant {target.tenant} rolled back to {target}")
    return 0


def cmd_delete(args: argparse.Namespace, out: Output) -> int:
    data, lines = _deleted(_store(args).delete(args.ref, args.force), out)
    out.result(data, "\n".join(lines))
    return 0


def _deleted(results: list[DeleteResult], out: Output) -> tuple[list[dict], list[str]]:
    """Deleted versions as JSON and as text lines; a kept blob's warning goes to stderr now."""
    for r in results:
        if r.warning:
            out.note(f"adapterctl: warning: {r.warning}")
    data = [{"deleted": str(r.version), "blob_deleted": r.blob_deleted, "warning": r.warning} for r in results]
    return data, [f"deleted {r.version}" + (" (blob removed)" if r.blob_deleted else "") for r in results]


def cmd_download(args: argparse.Namespace, out: Output) -> int:
    store = _store(args)
    record = store.resolve(args.ref)
    dest = args.output or Path(f"{record.tenant}-{record.name}-v{record.version}.safetensors")
    if dest.exists() and not args.force:
        raise ConflictError(f"{dest} exists; pass --force to overwrite it")
    with out.progress(f"download {record.ref}", record.size) as progress:
        store.download(record, dest, progress)
    out.result({"path": str(dest), **record.to_json()}, f"wrote {dest} ({record.ref}, {record.size} bytes, sha256 verified)")
    return 0


def cmd_tenant_create(args: argparse.Namespace, out: Output) -> int:
    quota = Quota(**_quota_changes(args))
    key = _store(args).create_tenant(args.tenant, quota)
    text = f"created tenant {args.tenant}; its API key (shown once, store it now):\n  {key}"
    out.result({"tenant": args.tenant, "api_key": key}, text)
    return 0


def cmd_tenant_show(args: argparse.Namespace, out: Output) -> int:
    registry = _store(args).registry
    record = registry.tenant(check_name(args.tenant))
    adapters = registry.adapters(record.tenant)
    out.result({**record.to_json(), "adapters": adapters}, tenant_text(record, adapters))
    return 0


def cmd_tenant_rotate_key(args: argparse.Namespace, out: Output) -> int:
    key = _store(args).rotate_key(args.tenant)
    out.result({"tenant": args.tenant, "api_key": key},
               f"new API key for {args.tenant} (shown once; the old key no longer works):\n  {key}")  # fmt: skip
    return 0


def cmd_tenant_set_quota(args: argparse.Namespace, out: Output) -> int:
    changes = _quota_changes(args)
    if not changes:
        raise UsageError("set-quota needs at least one of --requests-per-minute, --tokens-per-minute, --max-concurrent")
    registry = _store(args).registry
    registry.set_quota(check_name(args.tenant), changes)
    record = registry.tenant(args.tenant)
    out.result(record.to_json(), tenant_text(record, registry.adapters(args.tenant)))
    return 0


def cmd_tenant_delete(args: argparse.Namespace, out: Output) -> int:
    data, lines = _deleted(_store(args).delete_tenant(args.tenant, args.force), out)
    lines.append(f"deleted tenant {args.tenant}; its API key no longer works")
    out.result({"tenant": args.tenant, "versions": data}, "\n".join(lines))
    return 0


def _quota_changes(args: argparse.Namespace) -> dict[str, int]:
    fields = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


if __name__ == "__main__":
    sys.exit(main())
