"""How `adapterctl` shows results: aligned text for people, one JSON document for scripts.

Results go to stdout, errors and progress bars to stderr, so `--json` output
can be piped as is.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from adapters_store.blobstore import Progress
from adapters_store.errors import AdapterValidationError, StoreError
from adapters_store.registry import TenantRecord, VersionRecord

_SHOWN_TARGETS = 4


@dataclass(frozen=True)
class Output:
    as_json: bool = False
    progress_bars: bool | None = None  # None: only on a terminal

    def result(self, data: object, text: str) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text)

    def error(self, error: StoreError) -> None:
        print(f"adapterctl: error: {error}", file=sys.stderr)
        if self.as_json:
            body = {"type": type(error).__name__, "message": str(error), "exit_code": error.exit_code}
            if isinstance(error, AdapterValidationError):
                body["problems"] = list(error.problems)
            print(json.dumps({"error": body}, indent=2, sort_keys=True))

    def note(self, text: str) -> None:
        """A human-only remark (warnings, hints) that must not pollute JSON output."""
        print(text, file=sys.stderr)

    @contextmanager
    def progress(self, what: str, total: int) -> Iterator[Progress]:
        from tqdm import tqdm

        disable = True if self.as_json or self.progress_bars is False else None  # None: tqdm checks for a tty
        bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   disable=disable, leave=False)  # fmt: skip
        with bar:
            yield bar.update


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    power = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    if not rows:
        return "(none)"
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def version_text(record: VersionRecord, current: bool) -> str:
    spec = record.spec
    rank = f"{spec.rank}" + (f" (alpha {spec.alpha:g}, scale {spec.lora_scale:g})" if spec.alpha is not None else "")
    targets = ", ".join(spec.targets[:_SHOWN_TARGETS]) + (", ..." if len(spec.targets) > _SHOWN_TARGETS else "")
    lines = [
        f"{record.ref}{'  (current)' if current else ''}",
        f"  kind        {spec.kind.value}",
        f"  rank        {rank}",
        f"  base model  {spec.base_model}",
        f"  targets     {len(spec.targets)} modules: {targets}",
        f"  size        {size(record.size)} ({record.size} bytes)",
        f"  sha256      {record.sha256}",
        f"  blob        {record.blob_uri}",
        f"  created     {when(record.created_at)}",
        f"  status      {record.status}",
    ]
    return "\n".join(lines)


def tenant_text(record: TenantRecord, adapters: Sequence[str]) -> str:
    q, limit = record.quota, _limit
    return "\n".join([
        f"tenant {record.tenant}",
        f"  current     {record.alias or '(none)'}",
        f"  adapters    {', '.join(adapters) or '(none)'}",
        f"  quota       {limit(q.requests_per_minute)} requests/min, {limit(q.tokens_per_minute)} tokens/min, "
        f"{limit(q.max_concurrent)} concurrent",
        f"  api key     sha256 {record.key_sha256[:12]}... (the key itself is never stored)",
        f"  created     {when(record.created_at)}",
    ])  # fmt: skip


def _limit(n: int) -> str:
    return "unlimited" if n == 0 else str(n)
