"""Deploy the worker application on a Ray cluster: Serve's gRPC proxy + the engine replicas."""

from __future__ import annotations

import time

import grpc
from ray import serve
from ray.serve.config import gRPCOptions

from adapters_store.settings import Settings as StoreSettings
from services.worker.deployment import WorkerReplica
from services.worker.settings import WorkerSettings

SERVICER = "services.protos.worker_pb2_grpc.add_WorkerServicer_to_server"


def build_app(settings: WorkerSettings, store: StoreSettings) -> serve.Application:
    """One GPU per replica where CUDA is visible, else `threads` CPUs (torch's threads in the replica)."""
    import torch

    resources = {"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": settings.threads}
    deployment = serve.deployment(
        WorkerReplica,
        name="WorkerReplica",
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options=resources,
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(settings, store)


def start_worker(settings: WorkerSettings, store: StoreSettings, timeout_s: float = 300) -> None:
    """Start Serve (its proxy: gRPC on `settings.grpc_port`, HTTP on loopback) on the connected Ray
    cluster and deploy the worker; returns once the proxy routes to it."""
    serve.start(
        http_options={"host": "127.0.0.1", "port": settings.http_port},
        grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    serve.run(build_app(settings, store), name=settings.app_name, route_prefix=f"/{settings.app_name}")
    wait_routable(f"127.0.0.1:{settings.grpc_port}", settings.app_name, timeout_s)


def wait_routable(address: str, app_name: str, timeout_s: float) -> None:
    """Until Serve's gRPC proxy at `address` lists `app_name` (it learns routes a moment after deploy)."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        while True:
            try:
                if app_name in api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=5).application_names:
                    return
            except grpc.RpcError:
                pass  # the proxy is starting, or its route table is not populated yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray Serve's gRPC proxy at {address} did not route to {app_name!r} within {timeout_s:.0f} s")
            time.sleep(0.1)


def app(args: dict[str, str]) -> serve.Application:
    """Application builder for Serve config files and `serve run services.worker.app:app`
    (KubeRay's RayService): settings from the environment (FLORA_WORKER_*, FLORA_BLOB_URL, ...)."""
    return build_app(WorkerSettings(**args), StoreSettings.from_env())
