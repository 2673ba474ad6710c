"""`flora-gateway client generate` against the real gateway: its text is the gRPC API's text,
streamed or not, sampling flags included; every failure is one line on stderr and an exit status
(1 for a gRPC status, named; 2 for bad usage), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli import main
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2
from tests.adapters_store.helpers import free_port
from tests.gateway.helpers import Stack, Tenant, call_metadata, request

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def flora(stack: Stack) -> Tenant:
    return stack.new_tenant(AdapterKind.FLORA, 2, ("attn.c_attn",), seed=11)


def client(stack: Stack, tenant: Tenant, *flags: str, key: str | None = None) -> list[str]:
    key = tenant.api_key if key is None else key
    return ["client", "generate", "--address", stack.router.address, "--tenant", tenant.name, "--prompt", PROMPT,
            "--api-key", key, *flags]  # fmt: skip


def run_client(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_streamed_text_as_a_user_runs_it_is_the_apis_text(stack: Stack, flora: Tenant):
    """A separate process, the key from FLORA_API_KEY, as the launcher's printed command runs."""
    direct = stack.stub().Generate(request(flora, PROMPT, 16), metadata=call_metadata(flora), timeout=60)
    argv = [sys.executable, "-m", "services.cli", "client", "generate", "--address", stack.router.address,
            "--tenant", flora.name, "--prompt", PROMPT, "--max-new-tokens", "16", "--stream"]  # fmt: skip
    done = subprocess.run(argv, env={**os.environ, "FLORA_API_KEY": flora.api_key}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == direct.text + "\n"
    summary = done.stderr.strip()
    assert summary.startswith(f"[{flora.ref} (flora rank 2) | {direct.usage.completion_tokens} tokens, prompt {direct.usage.prompt_tokens} | finish: ")
    assert "first token" in summary and summary.count("\n") == 0


def test_unary_text_is_the_apis_text_and_names_the_adapter(stack: Stack, flora: Tenant, capsys):
    direct = stack.stub().Generate(request(flora, PROMPT, 16), metadata=call_metadata(flora), timeout=60)
    code, out, err = run_client(capsys, client(stack, flora, "--max-new-tokens", "16"))
    assert code == 0
    assert out == direct.text + "\n"
    finish = {gateway_pb2.FINISH_REASON_LENGTH: "length", gateway_pb2.FINISH_REASON_STOP: "stop"}[direct.finish_reason]
    assert err.startswith(f"[{flora.ref} (flora rank 2) | {direct.usage.completion_tokens} tokens, prompt {direct.usage.prompt_tokens} | finish: {finish} | ")
    assert "first token" not in err  # a unary call cannot see it


def test_sampling_flags_reach_the_gateway(stack: Stack, flora: Tenant, capsys):
    """Seeded sampling with every flag gives exactly the API's text for the same parameters."""
    sampling = dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    direct = stack.stub().Generate(request(flora, PROMPT, 20, **sampling), metadata=call_metadata(flora), timeout=60)
    greedy = stack.stub().Generate(request(flora, PROMPT, 20), metadata=call_metadata(flora), timeout=60)
    assert direct.text != greedy.text  # else the flags would prove nothing
    flags = ["--max-new-tokens", "20", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "1234", "--stream"]
    code, out, _ = run_client(capsys, client(stack, flora, *flags))
    assert code == 0 and out == direct.text + "\n"


def test_base_model_tenant_is_named_so(stack: Stack, capsys):
    base = stack.new_tenant(None)
    code, _, err = run_client(capsys, client(stack, base, "--max-new-tokens", "4", "--stream"))
    assert code == 0 and err.startswith("[base model | 4 tokens")


def one_error_line(err: str, status: str) -> str:
    """The whole of stderr: one line, `flora-gateway client: error: STATUS: details`; returns the details."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"flora-gateway client: error: {status}: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_key_is_one_line_unauthenticated_exit_1(stack: Stack, flora: Tenant, capsys, stream: bool):
    code, out, err = run_client(capsys, client(stack, flora, *(["--stream"] if stream else []), key="flk_not-a-key"))
    assert code == 1 and out == ""
    assert "API key is not valid" in one_error_line(err, "UNAUTHENTICATED")


def test_another_tenants_key_is_permission_denied(stack: Stack, flora: Tenant, capsys):
    other = stack.new_tenant(None)
    code, _, err = run_client(capsys, client(stack, flora, "--stream", key=other.api_key))
    assert code == 1
    assert f"not {flora.name}" in one_error_line(err, "PERMISSION_DENIED")


def test_unknown_tenant_is_not_found(stack: Stack, flora: Tenant, capsys):
    ghost = Tenant("no-such-tenant", flora.api_key, "")
    code, _, err = run_client(capsys, client(stack, ghost))
    assert code == 1
    assert one_error_line(err, "NOT_FOUND") == "tenant no-such-tenant does not exist"


def test_a_value_past_the_routers_limit_is_invalid_argument_naming_the_field(stack: Stack, flora: Tenant, capsys):
    code, _, err = run_client(capsys, client(stack, flora, "--max-new-tokens", "100000", "--stream"))
    assert code == 1
    assert one_error_line(err, "INVALID_ARGUMENT").startswith("sampling.max_new_tokens: must be in 1..")


def test_no_server_is_one_line_unavailable(flora: Tenant, capsys):
    argv = ["client", "generate", "--address", f"127.0.0.1:{free_port()}", "--tenant", flora.name, "--prompt", PROMPT,
            "--api-key", flora.api_key, "--stream"]  # fmt: skip
    code, out, err = run_client(capsys, argv)
    assert code == 1 and out == ""
    one_error_line(err, "UNAVAILABLE")


def test_missing_key_is_one_line_exit_2(stack: Stack, flora: Tenant, capsys, monkeypatch):
    monkeypatch.delenv("FLORA_API_KEY", raising=False)  # the environment the user runs it in, not the code
    argv = ["client", "generate", "--address", stack.router.address, "--tenant", flora.name, "--prompt", PROMPT]
    code, out, err = run_client(capsys, argv)
    assert (code, out) == (2, "")
    assert err == "flora-gateway client: error: no API key: pass --api-key or set FLORA_API_KEY\n"


def test_a_bad_flag_value_is_one_line_exit_2_before_any_call(flora: Tenant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["client", "generate", "--tenant", flora.name, "--prompt", PROMPT, "--top-p", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "flora-gateway client generate: error: argument --top-p: expected a number in (0, 1], got '0'\n"
