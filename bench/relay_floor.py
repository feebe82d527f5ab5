"""The Python floor of a proxy: uvicorn as `duoserve serve` runs it (uvloop, httptools, no
server header, no access log) and the gateway's own backend client (duoserve's HTTPPool), with
nothing between them. Every POST's body goes as it is to UPSTREAM's /predictions/MODEL, with
the client's Authorization header if it sent one (as nginx passes it on), and the answer comes
back as it is: no routing, parsing, validation, limits, metrics or other headers. Any other
method gets an empty 200 from the relay itself (the benchmark's readiness check).

bench/proxy_cost.py runs it beside nginx and the gateway, in front of the real TorchServe and
of bench/stub_backend.py: the gateway's CPU per request above this one's is what its features
and layers cost; this one's is what any proxy written on this Python stack costs at least.

    python bench/relay_floor.py UPSTREAM MODEL PORT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "gateway"))

import uvicorn  # noqa: E402

from duoserve.backends.httpclient import HTTPPool  # noqa: E402

JSON = {"Content-Type": "application/json"}


def relay_app(upstream: str, model: str) -> Any:
    pool = HTTPPool(upstream, 128)  # connects on first use, on the server's loop
    target = f"/predictions/{model}"
    head = [(b"content-type", b"application/json")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = JSON
        for name, value in scope["headers"]:
            if name == b"authorization":
                headers = {**JSON, "Authorization": value.decode("latin-1")}
                break
        reply = await pool.request("POST", target, body=body, headers=headers, timeout_s=10.0)
        length = (b"content-length", str(len(reply.body)).encode())
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": [*head, length]}
        )
        await send({"type": "http.response.body", "body": reply.body})

    return app


def main() -> None:
    upstream, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvicorn.run(
        relay_app(upstream, model),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="none",
        server_header=False,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
