"""Gateway messages <-> worker messages and registry records, in one place."""

from __future__ import annotations

from collections.abc import Iterable

from adapters_store.registry import VersionRecord
from services.protos import gateway_pb2, worker_pb2


def worker_request(request: gateway_pb2.GenerateRequest, adapter: VersionRecord | None) -> worker_pb2.WorkerRequest:
    blob = None if adapter is None else worker_pb2.AdapterBlob(ref=str(adapter.ref), sha256=adapter.sha256, size=adapter.size)
    return worker_pb2.WorkerRequest(prompt=request.prompt, sampling=request.sampling, adapter=blob)


def adapter_version(adapter: VersionRecord | None) -> gateway_pb2.AdapterVersion:
    if adapter is None:
        return gateway_pb2.AdapterVersion()
    return gateway_pb2.AdapterVersion(ref=str(adapter.ref), kind=adapter.spec.kind.value, rank=adapter.spec.rank)


def usage(chunk: worker_pb2.WorkerChunk) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


def stream_chunk(chunk: worker_pb2.WorkerChunk, adapter: gateway_pb2.AdapterVersion | None) -> gateway_pb2.GenerateChunk:
    return gateway_pb2.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason,
                                     usage=usage(chunk), adapter=adapter)  # fmt: skip


def response(chunks: Iterable[worker_pb2.WorkerChunk], adapter: gateway_pb2.AdapterVersion) -> gateway_pb2.GenerateResponse:
    chunks = list(chunks)
    last = chunks[-1] if chunks else worker_pb2.WorkerChunk()
    return gateway_pb2.GenerateResponse(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason,
        usage=usage(last),
        adapter=adapter,
    )
