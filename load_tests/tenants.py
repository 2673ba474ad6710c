"""Provision the load test's tenants in the running `make run` stack and write their API keys.

    .venv/bin/python load_tests/tenants.py [--count 16] [--out .cache/load/tenants.json] [flora-gateway serve's flags]

Tenant i is `load-<i>-<kind>`: kinds FLoRA, LoRA, IA3 in turn, FLoRA and LoRA ranks cycling
through RANKS (capped at the worker's largest slot pool, FLORA_WORKER_MAX_RANK), on the module types of the demo tenants
of the model's family (services/demo.py), with seeded synthetic weights (services/demo_adapters.py).
They are uploaded through the adapter store exactly as the launcher uploads the demo tenants,
into the stack's Redis and blob store, found the way `flora-gateway serve` finds them: its own
settings code (services/launcher.py `plan`), so the same FLORA_* variables and flags (e.g.
--redis-port) apply. Pass the flags you gave `flora-gateway serve`, if any.

Idempotent: a tenant that exists with the kind and rank planned and whose key the file holds is
left alone; otherwise its adapter is uploaded (identical bytes change nothing) and a key that
is lost is replaced. The file is the launcher's demo-tenants.json format, in tenant order
(the order the locustfile's Zipf draw ranks them by):

    {"address": "127.0.0.1:50051", "tenants": {"load-000-flora": {"api_key": "flk_...",
     "adapter": "load-000-flora/default@1", "kind": "flora rank 1"}, ...}}

Exit status 0, or 1 with one line on stderr (2 for a bad flag or setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from adapters_store.api_keys import hash_api_key
from adapters_store.errors import BackendUnavailable, NotFoundError, StoreError
from adapters_store.store import AdapterStore
from services.demo import DemoTenant, demo_tenants, write_demo_adapter
from services.engine.adapter_format import AdapterKind
from services.env import cache_root
from services.launcher import DemoKey, add_arguments, check_demo_modules, created, plan, read_saved_keys, shown, valid_key, write_keys
from services.local_processes import LaunchError, SettingsError, one_line

PROG = "load_tests/tenants.py"
DEFAULT_OUT = cache_root() / "load" / "tenants.json"  # where the locustfile looks by default
KINDS = (AdapterKind.FLORA, AdapterKind.LORA, AdapterKind.IA3)
# Tenant i's rank is RANKS[i % 5]: 5 and the 3 kinds are coprime, so each kind takes every rank in turn,
# and a batch mixes slot pools of several ranks as real tenants' batches do.
RANKS = (1, 8, 4, 16, 2)
SEED_BASE = 1000  # the demo tenants use seeds 0-2: distinct seeds keep every tenant's adapter (and blob) its own


def planned_tenants(count: int, model_dir: Path, max_rank: int) -> list[DemoTenant]:
    """`count` tenants, the kinds in turn, on the demo tenants' module types for this model family."""
    modules = {t.kind: t.module_types for t in demo_tenants(model_dir) if t.kind is not None}
    tenants = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        rank = 1 if kind is AdapterKind.IA3 else min(RANKS[i % len(RANKS)], max_rank)
        tenants.append(DemoTenant(f"load-{i:03d}-{kind.value}", kind, rank, modules[kind]))
    return tenants


def up_to_date(store: AdapterStore, tenant: DemoTenant, saved_key: str | None) -> bool:
    """The tenant exists with the saved key and a current adapter of the planned kind, rank and base model."""
    try:
        record = store.registry.tenant(tenant.name)
    except NotFoundError:
        return False
    if not saved_key or hash_api_key(saved_key) != record.key_sha256 or record.alias is None:
        return False
    spec = store.resolve(record.alias).spec
    return (spec.kind, spec.rank, spec.base_model) == (tenant.kind, tenant.rank, store.settings.base_model)


def provision_one(store: AdapterStore, tenant: DemoTenant, seed: int, model_dir: Path, tmp: Path, saved_key: str | None) -> DemoKey:
    if up_to_date(store, tenant, saved_key):
        key = saved_key
    else:
        path = write_demo_adapter(tmp / f"{tenant.name}.safetensors", tenant, model_dir, store.settings.base_model, seed)
        key = created(store, tenant.name, path) or valid_key(store, tenant.name, saved_key)
    alias = store.registry.tenant(tenant.name).alias
    return DemoKey(tenant.name, key, str(alias), tenant.describe())


def provision(store: AdapterStore, model_dir: Path, count: int, max_rank: int, out: Path, address: str) -> list[DemoKey]:
    """Every planned tenant ready with a working key, written to `out` (mode 0600: it holds keys)."""
    saved = read_saved_keys(out)
    with tempfile.TemporaryDirectory() as tmp:
        keys = [provision_one(store, tenant, SEED_BASE + i, model_dir, Path(tmp), saved.get(tenant.name))
                for i, tenant in enumerate(planned_tenants(count, model_dir, max_rank))]  # fmt: skip
    write_keys(out, address, keys)
    return keys


# ---- the command line -------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--count", type=positive_int, default=16, help="tenants to provision (default 16)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the tenants file (default {shown(DEFAULT_OUT)})")
    add_arguments(p.add_argument_group("the stack's settings, as given to `flora-gateway serve`"))
    return p


def running_address(cache: Path, listen: str) -> str:
    """The router's address as the running launcher wrote it (where it really listens), else its --listen."""
    try:
        return str(json.loads((cache / "demo-tenants.json").read_text())["address"])
    except (OSError, ValueError, KeyError, TypeError):
        return listen


def summary(keys: list[DemoKey], out: Path) -> str:
    kinds = Counter(k.describe.split()[0] for k in keys)
    mix = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return f"{PROG}: {len(keys)} tenants ({mix}) ready; their keys in {shown(out)}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        stack = plan(args)
        max_rank = max(stack.worker.ranks)  # the largest slot pool: a higher rank would be refused
        check_demo_modules(stack, planned_tenants(args.count, stack.model_dir, max_rank))
        store = AdapterStore.open(stack.store)
        address = running_address(stack.cache, stack.router.listen)
        keys = provision(store, stack.model_dir, args.count, max_rank, args.out, address)
    except BackendUnavailable as error:
        print(f"{PROG}: error: {one_line(error)} (is the stack running? start it with `make run`)", file=sys.stderr)
        return 1
    except (LaunchError, StoreError, ValueError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, SettingsError) else 1
    print(summary(keys, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
