"""The `flora-gateway` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_bench_kernels_help_is_reachable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernels", "--help"])
    assert exit_info.value.code == 0
    assert "--threads" in capsys.readouterr().out


def test_unknown_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_demo_serves_every_tenant_as_if_alone():
    """`make run`'s job: four tenants (FLoRA, LoRA, IA3 files validated by the store, and the base
    model) in one continuous batch, each getting exactly the tokens it gets alone."""
    out = subprocess.run([sys.executable, "-m", "services.cli", "demo"], capture_output=True, text=True, check=True, timeout=600).stdout
    assert out.count(": valid ") == 3
    assert out.count("[same as alone]") == 4 and "DIFFERS" not in out
