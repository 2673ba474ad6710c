"""Worker messages <-> the engine's types, in one place."""

from __future__ import annotations

from services.engine.engine import StepOutput
from services.engine.sampling import SamplingParams
from services.engine.sequence import FinishReason
from services.protos import gateway_pb2, worker_pb2

DEFAULT_MAX_NEW_TOKENS = 128  # proto/gateway.proto documents the defaults

_FINISH = {
    FinishReason.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: gateway_pb2.FINISH_REASON_STOP,
}


def sampling_params(sampling: gateway_pb2.SamplingParams) -> SamplingParams:
    """The request's sampling, unset fields at their defaults; ValueError names a bad field."""
    s = sampling
    return SamplingParams(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
    )


def chunk(outputs: list[StepOutput]) -> worker_pb2.WorkerChunk:
    """One or more engine steps' outputs for one request, as one message. ABORTED never reaches a
    client (it left)."""
    last = outputs[-1]
    return worker_pb2.WorkerChunk(
        token_ids=[t for o in outputs for t in o.new_token_ids],
        text="".join(o.text for o in outputs),
        finish_reason=_FINISH.get(last.finish_reason, gateway_pb2.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=last.num_prompt_tokens,
        completion_tokens=last.num_output_tokens,
    )
