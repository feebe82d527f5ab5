"""A TF Serving replica over gRPC (backends/tfserving/grpc_api.py) against a real gRPC server on
loopback: what an ejected replica's health probe sees when the server comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from duoserve.backends.tfserving.grpc_api import GrpcAPI, GrpcReplica
from duoserve.protos import get_model_status_pb2
from tests.servers import free_port

Status = get_model_status_pb2.ModelVersionStatus


async def every_model_available(
    request: get_model_status_pb2.GetModelStatusRequest, context: object
) -> get_model_status_pb2.GetModelStatusResponse:
    """ModelService/GetModelStatus: version 1 of every model is AVAILABLE."""
    available = Status(version=1, state=Status.AVAILABLE)
    return get_model_status_pb2.GetModelStatusResponse(model_version_status=[available])


@asynccontextmanager
async def model_server(port: int) -> AsyncIterator[None]:
    """TF Serving's ModelService on loopback (the official message types, no TensorFlow)."""
    handler = grpc.unary_unary_rpc_method_handler(
        every_model_available,
        request_deserializer=get_model_status_pb2.GetModelStatusRequest.FromString,
        response_serializer=get_model_status_pb2.GetModelStatusResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "tensorflow.serving.ModelService", {"GetModelStatus": handler}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield
    finally:
        await server.stop(0)


async def probe(api: GrpcAPI, port: int) -> bool:
    """One probe as an ejected replica's gets it: over a fresh replica (channel), then closed."""
    fresh = GrpcReplica("127.0.0.1", port)
    try:
        return await api.ready(fresh, "digits", None)
    finally:
        await fresh.close()


async def test_a_restarted_server_passes_the_first_probe_after_failed_ones() -> None:
    """The server dies under the replica's channel, whose calls fail (those that get a replica
    ejected); the ejected replica keeps that channel while probes over fresh channels fail for
    seconds; the first probe once the server is back passes. Channels sharing one connection
    would share the reconnect backoff the failures grew, and fail that probe and the next ones
    for up to the backoff's 5 s cap (seen in CI: a restarted replica back after 6.3 s)."""
    api = GrpcAPI("tfs")
    port = free_port()
    in_rotation = GrpcReplica("127.0.0.1", port)
    try:
        async with model_server(port):
            assert await api.ready(in_rotation, "digits", None)
        for _ in range(3):
            assert not await api.ready(in_rotation, "digits", None)
        for _ in range(12):  # 3 s of probes while the server is down
            assert not await probe(api, port)
            await asyncio.sleep(0.25)
        async with model_server(port):
            assert await probe(api, port), "the first probe after the restart failed"
    finally:
        await in_rotation.close()
