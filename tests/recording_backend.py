"""An HTTP server standing in for TorchServe and for a V2 server that records what the gateway
sent it (TorchServe cannot show the headers it received)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback_http import LoopbackHTTPServer


class RecordingBackend:
    """An HTTP server standing in for TorchServe (``/ping``, ``/predictions/{model}``) and a V2
    server (``/v2/health/*``, ``/v2/models/{model}/infer``): answers every prediction with ten
    probabilities per row (a model whose name has ``broken`` in it: with JSON that is no
    inference answer), and keeps the path and headers of each POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _answer(self, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/ping":
                    self._answer({"status": "Healthy"})
                else:
                    self._answer({})

            def do_POST(self) -> None:  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                backend.received.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                rows = request["inputs"][0]["shape"][0]
                if "broken" in self.path:
                    self._answer({"not": "an inference answer"})
                    return
                self._answer(
                    {
                        "model_name": "digits",
                        "outputs": [
                            {
                                "name": "probabilities",
                                "datatype": "FP32",
                                "shape": [rows, 10],
                                "data": [0.1] * (rows * 10),
                            }
                        ],
                    }
                )

        self._http = LoopbackHTTPServer(Handler)
        self.url = self._http.url

    def traceparents(self) -> list[str | None]:
        return [headers.get("traceparent") for _, headers in self.received]

    def close(self) -> None:
        self._http.close()
