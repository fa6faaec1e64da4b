"""The echo server's gRPC service (grpcio): ``weft.lab.Echo/Echo``, unary, raw bytes in
and out (a generic handler: no generated code), answering the echo JSON. Metadata
``delay_ms``, ``status`` and ``fail`` inject failures as the HTTP query parameters do;
an HTTP status >= 500 becomes ``UNAVAILABLE``, other 4xx ``FAILED_PRECONDITION``."""

from __future__ import annotations

import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from weft.lab.echo import EchoServer

SERVICE = "weft.lab.Echo"
METHOD = "Echo"
FULL_METHOD = f"/{SERVICE}/{METHOD}"


def start_grpc(app: EchoServer, host: str, port: int) -> grpc.Server:
    from weft.lab.echo import Request, injected_by

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = [(k, v if isinstance(v, str) else v.decode("latin-1"))
                    for k, v in context.invocation_metadata()]  # fmt: skip
        delay, status = injected_by(metadata, app.pod)
        if delay:
            time.sleep(delay)
        if status >= 500:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{app.pod}: injected {status}")
        elif status >= 400:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{app.pod}: injected {status}")
        req = Request("POST", FULL_METHOD, "gRPC", metadata)
        return app.payload(context.peer(), None, req, len(request))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server
