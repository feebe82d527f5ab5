"""A corpus of malformed and hostile requests on all three front doors: every answer is a 4xx
(never a 5xx), and the gateway still classifies correctly afterwards. In-process for bodies,
over a real socket (uvicorn) for what ASGITransport cannot express: chunked bodies, broken
Content-Length, header abuse."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import GatewayFactory, embedded_config, v2_body
from tests.resilience.conftest import start_gateway

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

V2, TFS, TS = "/v2/models/digits/infer", "/v1/models/digits:predict", "/predictions/digits"
LIMIT = 4 * 1024 * 1024
DEEP = b"[" * 10_000 + b"]" * 10_000


def _v2(**tensor: object) -> bytes:
    base: dict[str, object] = {"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**base, **tensor}]})


def corpus() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(what, path, body, headers)."""
    json_ = {"content-type": "application/json"}
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB inflated
    items: list[tuple[str, str, bytes, dict[str, str]]] = []
    for path in (V2, TFS, TS):
        items += [
            ("empty body", path, b"", json_),
            ("truncated JSON", path, b'{"inputs": [{"name": "pix', json_),
            ("not JSON", path, b"hello", json_),
            ("JSON null", path, b"null", json_),
            ("JSON string", path, b'"pixels"', json_),
            ("JSON number", path, b"42", json_),
            ("empty object", path, b"{}", json_),
            ("NaN literal", path, b'{"inputs": [NaN], "instances": [Infinity]}', json_),
            ("invalid UTF-8", path, b'{"inputs": "\xff\xfe\xfd"}', json_),
            ("deep nesting, whole body", path, DEEP, json_),
            ("oversize body", path, b"[" + b"0," * (LIMIT // 2) + b"0]", json_),
            ("gzip bomb", path, bomb, {**json_, "content-encoding": "gzip"}),
            (
                "broken gzip",
                path,
                b"\x1f\x8b\x08\x00garbage",
                {**json_, "content-encoding": "gzip"},
            ),
            ("unknown encoding", path, b"{}", {**json_, "content-encoding": "br"}),
            ("text/plain", path, b"{}", {"content-type": "text/plain"}),
            ("form", path, b"a=b", {"content-type": "application/x-www-form-urlencoded"}),
            ("bad timeout header", path, b"{}", {**json_, "x-duoserve-timeout-ms": "-5"}),
            ("NaN timeout header", path, b"{}", {**json_, "x-duoserve-timeout-ms": "nan"}),
            ("bad framework pin", path, b"{}", {**json_, "x-duoserve-framework": "jax"}),
        ]
    items += [
        ("V2 inputs not a list", V2, b'{"inputs": "x"}', json_),
        ("V2 shape a string", V2, _v2(shape="big", data=[1]), json_),
        ("V2 huge shape", V2, _v2(shape=[1_000_000_000, 8, 8], data=[1]), json_),
        ("V2 shape overflow", V2, _v2(shape=[2**62, 2**62, 8], data=[1]), json_),
        ("V2 negative shape", V2, _v2(shape=[-1, 8, 8], data=[1]), json_),
        ("V2 too many dims", V2, _v2(shape=[1] * 40, data=[1]), json_),
        ("V2 deep data", V2, _v2(data=orjson.Fragment(DEEP)), json_),
        ("V2 strings as FP32", V2, _v2(data=["a"] * 64), json_),
        ("V2 ragged data", V2, _v2(data=[[1, 2], [3]]), json_),
        ("V2 data/shape mismatch", V2, _v2(data=[1.0] * 63), json_),
        ("V2 wrong datatype", V2, _v2(datatype="INT8", data=[1] * 64), json_),
        ("V2 unknown datatype", V2, _v2(datatype="FP128", data=[1] * 64), json_),
        ("V2 wrong input name", V2, _v2(name="image", data=[1.0] * 64), json_),
        ("V2 huge integer", V2, _v2(data=orjson.Fragment(b"[1" + b"0" * 400 + b"]")), json_),
        (
            "V2 binary size lie",
            V2,
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "shape": [1, 8, 8],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": 10**9},
                        }
                    ]
                }
            ),
            {"content-type": "application/octet-stream", "inference-header-content-length": "10"},
        ),
        ("TFS both keys", TFS, b'{"instances": [1], "inputs": [1]}', json_),
        ("TFS deep instances", TFS, b'{"instances": ' + DEEP + b"}", json_),
        ("TFS huge batch", TFS, orjson.dumps({"instances": [[[0] * 8] * 8] * 5000}), json_),
        ("TFS wrong rank", TFS, orjson.dumps({"instances": [1, 2, 3]}), json_),
        ("TFS b64 in FP32", TFS, b'{"instances": [{"b64": "AAAA"}]}', json_),
        ("TS deep bare list", TS, DEEP, json_),
        ("TS unknown input", TS, b'{"image": [1]}', json_),
        ("TS wrong shape", TS, orjson.dumps([[1.0] * 7]), json_),
    ]
    return items


async def _good_prediction(client: httpx.AsyncClient, image: np.ndarray) -> int:
    answer = await client.post(V2, json=v2_body(image[None]))
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    return int(np.argmax(out["data"]))


async def test_bad_input_corpus_gets_4xx_in_process(
    gateway: GatewayFactory, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits_samples
    async with gateway(embedded_config()) as (client, _):
        failures = []
        for what, path, body, headers in corpus():
            answer = await client.post(path, content=body, headers=headers)
            if not 400 <= answer.status_code < 500:
                failures.append((what, path, answer.status_code, answer.text[:200]))
            if what in ("oversize body", "gzip bomb"):
                assert answer.status_code == 413, (what, path)
            # V2 names its media types; TF Serving and TorchServe clients (curl -d) send
            # form or text types for JSON, and those front doors read them as JSON, as the
            # real servers do.
            if what == "unknown encoding" or (path == V2 and what in ("text/plain", "form")):
                assert answer.status_code == 415, (what, path)
            assert "Traceback" not in answer.text
        assert not failures, failures
        # Alive and correct afterwards: the held-out images are classified right.
        right = [await _good_prediction(client, images[i]) == labels[i] for i in range(20)]
        assert sum(right) >= 18


async def test_compare_is_bounded_like_infer(gateway: GatewayFactory) -> None:
    async with gateway(embedded_config()) as (client, _):
        big = b"[" + b"0," * (LIMIT // 2) + b"0]"
        assert (await client.post("/v2/models/digits/compare", content=big)).status_code == 413
        text = await client.post(
            "/v2/models/digits/compare", content=b"{}", headers={"content-type": "text/plain"}
        )
        assert text.status_code == 415
        deep = await client.post("/v2/models/digits/compare", content=DEEP)
        assert deep.status_code == 400


# -- over a real socket ----------------------------------------------------------------------


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return whatever the server answers before closing (or b'')."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(rest) >= length[0]:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def _status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


def _chunked(body: bytes, size: int = 65536) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def test_socket_level_abuse_gets_4xx(
    tmp_path: Path, model_store: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    server = start_gateway(tmp_path, embedded_config())
    try:
        good = orjson.dumps(v2_body(digits_samples[0][:1]))
        big = b"[" + b"0," * (LIMIT // 2) + b"0]"
        cases = {
            "chunked oversize": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\n\r\n"
            ).encode()
            + _chunked(big),
            "chunked TorchServe oversize": (
                f"POST {TS} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            ).encode()
            + _chunked(big),
            "Content-Length over the limit": (
                f"POST {TFS} HTTP/1.1\r\nhost: x\r\ncontent-length: {LIMIT + 1}\r\n\r\n{{}}"
            ).encode(),
            "Content-Length not a number": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n{{}}"
            ).encode(),
            "negative Content-Length": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\ncontent-length: -4\r\n\r\n{{}}"
            ).encode(),
            "two Content-Lengths": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                "content-length: 9\r\n\r\n{}"
            ).encode(),
            "huge header value": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\nx-duoserve-route-key: {'a' * 200_000}\r\n"
                f"content-length: 2\r\n\r\n{{}}"
            ).encode(),
            "many headers": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\n"
                + "".join(f"x-h{i}: {i}\r\n" for i in range(5000))
                + "content-length: 2\r\n\r\n{}"
            ).encode(),
            "garbage request line": b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
            "huge request id": (
                f"POST {V2} HTTP/1.1\r\nhost: x\r\nx-request-id: {'b' * 50_000}\r\n"
                f"content-length: {len(good)}\r\n\r\n"
            ).encode()
            + good,
        }
        seen = {}
        for what, data in cases.items():
            answer = _raw(server.port, data)
            status = _status(answer)
            seen[what] = status
            # A 4xx, or (for what the HTTP parser itself refuses) a closed connection; never 5xx.
            assert (
                status is None
                or 400 <= status < 500
                or (what == "huge request id" and status == 200)
            ), (what, answer[:300])
            assert b"Traceback" not in answer
        print("socket abuse:", seen)
        assert seen["chunked oversize"] == 413 and seen["chunked TorchServe oversize"] == 413
        assert seen["Content-Length over the limit"] == 413
        # Alive and correct afterwards.
        answer = httpx.post(server.url + V2, content=good, timeout=10)
        assert answer.status_code == 200
        (out,) = answer.json()["outputs"]
        assert int(np.argmax(out["data"])) == int(digits_samples[1][0])
    finally:
        server.stop()
