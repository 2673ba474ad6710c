"""`flora-gateway client generate`: one request to a running gateway, from the shell.

    FLORA_API_KEY=flk_... flora-gateway client generate --tenant user42 --prompt 'def fibonacci(n):' --stream

The text goes to stdout (as it arrives with --stream, then one newline); a one-line summary
goes to stderr: the adapter version that served it, tokens, finish reason and, when
streaming, the time to the first token. Sampling flags left out take the gateway's
defaults (proto/gateway.proto), so the request is what `grpcurl` would send.

Exit status, and the one line on stderr that says why (never a traceback):
  0  the text came back
  1  the gateway refused or failed the call: `flora-gateway client: error: STATUS: details`,
     STATUS being the gRPC status name (UNAUTHENTICATED, NOT_FOUND, UNAVAILABLE, ...)
  2  bad usage: no API key (neither --api-key nor FLORA_API_KEY), or a bad flag value
  130 interrupted (Ctrl-C); the call is cancelled, which frees its place in the batch
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import grpc

from services.env import environ
from services.protos import gateway_pb2, gateway_pb2_grpc

PROG = "flora-gateway client"
DEFAULT_ADDRESS = "127.0.0.1:50051"  # the router's default listen address (FLORA_ROUTER_LISTEN)
API_KEY_VARIABLE = "FLORA_API_KEY"
FINISH = {gateway_pb2.FINISH_REASON_LENGTH: "length", gateway_pb2.FINISH_REASON_STOP: "stop"}


@dataclass
class Outcome:
    """What the summary line reports."""

    adapter: gateway_pb2.AdapterVersion
    usage: gateway_pb2.Usage
    finish_reason: int
    seconds: float
    first_token_s: float | None = None  # streaming only: a unary call cannot observe it


def run(args: argparse.Namespace) -> int:
    key = args.api_key or environ().get(API_KEY_VARIABLE)
    if not key:
        print(f"{PROG}: error: no API key: pass --api-key or set {API_KEY_VARIABLE}", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(args.address or DEFAULT_ADDRESS) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stream if args.stream else unary
        try:
            outcome = call(stub, generate_request(args), metadata, args.timeout)
        except grpc.RpcError as error:
            print(f"{PROG}: error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # leaving the `with` closes the channel, which cancels the call
            print(f"\n{PROG}: interrupted", file=sys.stderr)
            return 130
    print(summary(outcome), file=sys.stderr)
    return 0


def generate_request(args: argparse.Namespace) -> gateway_pb2.GenerateRequest:
    """Only the flags given are set: the gateway applies its defaults to the rest."""
    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed}  # fmt: skip
    sampling = gateway_pb2.SamplingParams(**{k: v for k, v in flags.items() if v is not None}, stop=args.stop)
    return gateway_pb2.GenerateRequest(tenant_id=args.tenant, prompt=args.prompt, sampling=sampling)


def unary(stub, request, metadata, timeout: float | None) -> Outcome:
    start = time.perf_counter()
    reply = stub.Generate(request, metadata=metadata, timeout=timeout)
    print(reply.text, flush=True)
    return Outcome(reply.adapter, reply.usage, reply.finish_reason, time.perf_counter() - start)


def stream(stub, request, metadata, timeout: float | None) -> Outcome:
    """Print each chunk's text as it arrives; the first chunk names the adapter, the last the finish."""
    start = time.perf_counter()
    outcome = Outcome(gateway_pb2.AdapterVersion(), gateway_pb2.Usage(), gateway_pb2.FINISH_REASON_UNSPECIFIED, 0.0)
    printed = False
    try:
        for chunk in stub.GenerateStream(request, metadata=metadata, timeout=timeout):
            if chunk.HasField("adapter"):
                outcome.adapter = chunk.adapter
            if chunk.token_ids and outcome.first_token_s is None:
                outcome.first_token_s = time.perf_counter() - start
            print(chunk.text, end="", flush=True)
            printed = printed or bool(chunk.text)
            outcome.usage, outcome.finish_reason = chunk.usage, chunk.finish_reason
    except grpc.RpcError:
        if printed:
            print(flush=True)  # the error's line starts on a line of its own
        raise
    print(flush=True)
    outcome.seconds = time.perf_counter() - start
    return outcome


def summary(outcome: Outcome) -> str:
    """e.g. `[user42/default@1 (flora rank 1) | 64 tokens, prompt 6 | finish: length | first token 0.12 s | 1.90 s]`"""
    a = outcome.adapter
    adapter = f"{a.ref} ({a.kind} rank {a.rank})" if a.ref else "base model"
    parts = [adapter, f"{outcome.usage.completion_tokens} tokens, prompt {outcome.usage.prompt_tokens}",
             f"finish: {FINISH.get(outcome.finish_reason, 'unspecified')}"]  # fmt: skip
    if outcome.first_token_s is not None:
        parts.append(f"first token {outcome.first_token_s:.2f} s")
    parts.append(f"{outcome.seconds:.2f} s")
    return f"[{' | '.join(parts)}]"
