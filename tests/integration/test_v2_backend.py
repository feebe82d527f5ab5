"""The V2 backend against real Open Inference Protocol servers: Seldon MLServer 1.7.1, which
does not implement the binary tensor extension, and NVIDIA Triton 2.51, which does.

Each serves the real digits model (its trained weights, computed with numpy in the server's own
venv: tests/v2_servers/), so answers are held to the embedded PyTorch runtime's. A tap between
the gateway and each server records what went over the wire: binary tensors to Triton, JSON to
MLServer, as each server's ``GET /v2`` says, asked once per replica.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from duoserve.codecs.v2 import binary_request
from duoserve.tensors import Tensor
from tests.conftest import DIGITS_IO, v2_body
from tests.servers import Gateway, free_port, http_get
from tests.timing import eventually
from tests.v2_servers.digits_numpy import export_weights
from tests.v2_servers.fixture import MLServerProcess, TritonProcess, WireTap

pytestmark = pytest.mark.integration

BINARY_REFUSED = (
    "the Open Inference Protocol backend could not read the gateway's binary tensor request"
)
LOOSE_IO = {  # lets a badly shaped image through the gateway, for the server to refuse
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, -1, -1]}],
    "outputs": DIGITS_IO["outputs"],
}


@pytest.fixture(scope="module")
def weights(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model's trained weights, from models/store's TorchScript."""
    out = tmp_path_factory.mktemp("digits-weights") / "digits.npz"
    return export_weights(model_store / "pytorch" / "digits" / "1" / "model.pt", out)


@pytest.fixture(scope="module")
def mlserver(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    server = MLServerProcess(tmp_path_factory.mktemp("mlserver"), weights)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def triton(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    server = TritonProcess(tmp_path_factory.mktemp("triton"), weights)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def taps(mlserver: MLServerProcess, triton: TritonProcess) -> Iterator[dict[str, WireTap]]:
    """A fresh tap in front of each server."""
    made: dict[str, WireTap] = {}
    try:
        made["mlserver"] = WireTap(mlserver.url)
        made["triton"] = WireTap(triton.url)
        yield made
    finally:
        for tap in made.values():
            tap.close()


def _config(backends: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
    return {"backends": backends, "models": models}


def _route(backend: str, model: str = "digits", io: dict[str, Any] = DIGITS_IO) -> dict[str, Any]:
    return {**io, "routes": [{"backend": backend, "framework": "pytorch", "model": model}]}


async def _v2(client: httpx.AsyncClient, model: str, images: np.ndarray) -> np.ndarray:
    response = await client.post(f"/v2/models/{model}/infer", json=v2_body(images))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [len(images), 10]
    return np.array(output["data"], dtype=np.float32).reshape(-1, 10)


async def _tfserving(client: httpx.AsyncClient, model: str, images: np.ndarray) -> np.ndarray:
    response = await client.post(f"/v1/models/{model}:predict", json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    return np.array(response.json()["predictions"], dtype=np.float32)


async def _torchserve(client: httpx.AsyncClient, model: str, images: np.ndarray) -> np.ndarray:
    response = await client.post(f"/predictions/{model}", json=images.tolist())
    assert response.status_code == 200, response.text
    return np.array(response.json(), dtype=np.float32)


FRONT_DOORS = {"v2": _v2, "tfserving": _tfserving, "torchserve": _torchserve}


def _assert_v2_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """The V2 error shape, the status, the words a user needs, and no server internals."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    message: str = body["error"]
    for fragment in fragments:
        assert fragment in message, message
    for internal in ("127.0.0.1", "mlserver.errors", "builtins.", "request id", "Traceback"):
        assert internal not in message, message
    return message


def test_the_servers_say_what_they_speak(mlserver: MLServerProcess, triton: TritonProcess) -> None:
    """The premise, from the real servers: MLServer lists no binary_tensor_data, Triton does."""
    status, body = http_get(f"{mlserver.url}/v2")
    assert status == 200
    meta = json.loads(body)
    assert (meta["name"], meta["version"]) == ("mlserver", "1.7.1")
    assert "binary_tensor_data" not in meta["extensions"]
    status, body = http_get(f"{triton.url}/v2")
    assert status == 200
    meta = json.loads(body)
    assert (meta["name"], meta["version"]) == ("triton", "2.51.0")
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("front_door", list(FRONT_DOORS))
async def test_every_front_door_gets_the_digits_from_mlserver_and_triton(
    gateway: Any,
    model_store: Path,
    taps: dict[str, WireTap],
    digits_samples: tuple[np.ndarray, np.ndarray],
    front_door: str,
) -> None:
    """Through each front door both servers classify like the embedded runtime; over the wire
    Triton got binary tensors both ways and MLServer JSON, each asked once with GET /v2."""
    images, labels = digits_samples
    batch = images[:40]
    config = _config(
        {
            "local": {"kind": "embedded", "model_store": str(model_store)},
            "mlserver": {"kind": "v2", "url": taps["mlserver"].url},
            "triton": {"kind": "v2", "url": taps["triton"].url},
        },
        {
            "reference": {
                **DIGITS_IO,
                "routes": [{"backend": "local", "framework": "pytorch", "model": "digits"}],
            },
            "on-mlserver": _route("mlserver"),
            "on-triton": _route("triton"),
        },
    )
    async with gateway(config) as (client, _):
        reference = await _v2(client, "reference", batch)
        assert (reference.argmax(axis=1) == labels[:40]).mean() >= 0.95
        for server in ("mlserver", "triton"):
            probabilities = await FRONT_DOORS[front_door](client, f"on-{server}", batch)
            assert probabilities.shape == (40, 10), server
            np.testing.assert_allclose(probabilities, reference, atol=1e-4, err_msg=server)
            np.testing.assert_array_equal(probabilities.argmax(axis=1), reference.argmax(axis=1))
    for server, binary in (("mlserver", False), ("triton", True)):
        tap = taps[server]
        assert [s.method for s in tap.calls("/v2")] == ["GET"], server  # once, at start
        infers = tap.calls("/digits/infer")
        assert len(infers) == 1, server
        assert all(s.status == 200 for s in infers), server
        assert all(s.binary is binary and s.binary_answer is binary for s in infers), infers
        expected_type = "application/octet-stream" if binary else "application/json"
        assert all(s.content_type == expected_type for s in infers), infers


def test_the_documented_one_line_backend_answers_from_mlserver(
    mlserver: MLServerProcess, tmp_path: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """`duoserve serve` with `{kind: v2, url: ...}` in front of MLServer answers 200 with the
    right digits; the old behaviour, forced with binary_tensors: true, is the 502 it was."""
    images, labels = digits_samples
    config = tmp_path / "models.yaml"
    config.write_text(
        yaml.safe_dump(
            _config(
                {
                    "mlserver": {"kind": "v2", "url": mlserver.url},
                    "always-binary": {"kind": "v2", "url": mlserver.url, "binary_tensors": True},
                },
                {"digits": _route("mlserver"), "digits-binary": _route("always-binary")},
            )
        )
    )
    gateway = Gateway(config, tmp_path, env={"DUOSERVE_LOG_LEVEL": "warning"})
    try:
        gateway.start()
        assert http_get(f"{gateway.url}/v2/models/digits/ready")[0] == 200
        status, body = _post(f"{gateway.url}/v2/models/digits/infer", v2_body(images[:20]))
        assert status == 200, body
        output = json.loads(body)["outputs"][0]
        predicted = np.array(output["data"]).reshape(20, 10).argmax(axis=1)
        assert (predicted == labels[:20]).mean() >= 0.9
        status, body = _post(f"{gateway.url}/v2/models/digits-binary/infer", v2_body(images[:1]))
        assert status == 502, body
        message = json.loads(body)["error"]
        assert message == BINARY_REFUSED
    finally:
        gateway.stop()


def _post(url: str, payload: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_binary_tensors_setting_overrides_what_the_server_says(
    gateway: Any, taps: dict[str, WireTap], digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """false sends JSON even to Triton, true binary (which MLServer cannot read: a 502 in the
    V2 error shape); neither asks GET /v2."""
    images, _ = digits_samples
    config = _config(
        {
            "triton-json": {"kind": "v2", "url": taps["triton"].url, "binary_tensors": False},
            "mlserver-binary": {"kind": "v2", "url": taps["mlserver"].url, "binary_tensors": True},
        },
        {"triton-json": _route("triton-json"), "mlserver-binary": _route("mlserver-binary")},
    )
    async with gateway(config) as (client, _):
        probabilities = await _v2(client, "triton-json", images[:8])
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        response = await client.post("/v2/models/mlserver-binary/infer", json=v2_body(images[:1]))
        assert _assert_v2_error(response, 502) == BINARY_REFUSED
    assert taps["triton"].calls("/v2") == [] and taps["mlserver"].calls("/v2") == []
    (to_triton,) = taps["triton"].calls("/infer")
    assert not to_triton.binary and not to_triton.binary_answer and to_triton.status == 200
    (to_mlserver,) = taps["mlserver"].calls("/infer")
    assert to_mlserver.binary and to_mlserver.status in (422, 500)  # 500: bytes not UTF-8


async def test_bad_input_is_the_clients_4xx_in_the_v2_error_shape(
    gateway: Any, mlserver: MLServerProcess, triton: TritonProcess
) -> None:
    """What each server refuses reaches the client as 400/404 with the server's reason, in
    the V2 shape (TF Serving's front door alike), without server internals or addresses."""
    config = _config(
        {
            "mlserver": {"kind": "v2", "url": mlserver.url},
            "triton": {"kind": "v2", "url": triton.url},
        },
        {
            "loose-mlserver": _route("mlserver", io=LOOSE_IO),
            "loose-triton": _route("triton", io=LOOSE_IO),
            "missing-mlserver": _route("mlserver", model="nope"),
            "missing-triton": _route("triton", model="nope"),
            "digits-mlserver": _route("mlserver"),
        },
    )
    small = np.zeros((1, 4, 4), dtype=np.float32)
    async with gateway(config) as (client, _):
        response = await client.post("/v2/models/loose-mlserver/infer", json=v2_body(small))
        _assert_v2_error(response, 400, "[n, 8, 8]", "[1, 4, 4]")
        response = await client.post("/v2/models/loose-triton/infer", json=v2_body(small))
        _assert_v2_error(response, 400, "unexpected shape for input 'pixels'", "[1,4,4]")
        response = await client.post(
            "/v1/models/loose-mlserver:predict", json={"instances": small.tolist()}
        )
        _assert_v2_error(response, 400, "[n, 8, 8]")
        for model in ("missing-mlserver", "missing-triton"):
            response = await client.post(
                f"/v2/models/{model}/infer", json=v2_body(np.zeros((1, 8, 8)))
            )
            _assert_v2_error(response, 404, "nope")
        # NaN travels in the binary extension, but a JSON-only server cannot be sent it.
        pixels = np.zeros((1, 8, 8), dtype=np.float32)
        pixels[0, 3, 3] = np.nan
        body, header_length = binary_request([Tensor("pixels", pixels, "FP32")])
        response = await client.post(
            "/v2/models/digits-mlserver/infer",
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        _assert_v2_error(response, 400, "input 'pixels' holds NaN or infinity")


async def test_readiness_follows_the_server(
    gateway: Any, mlserver: MLServerProcess, triton: TritonProcess
) -> None:
    config = _config(
        {
            "mlserver": {"kind": "v2", "url": mlserver.url},
            "triton": {"kind": "v2", "url": triton.url},
        },
        {
            "digits-mlserver": _route("mlserver"),
            "digits-triton": _route("triton"),
            "missing-mlserver": _route("mlserver", model="nope"),
            "missing-triton": _route("triton", model="nope"),
        },
    )
    async with gateway(config) as (client, _):
        for model, ready in (
            ("digits-mlserver", True),
            ("digits-triton", True),
            ("missing-mlserver", False),
            ("missing-triton", False),
        ):
            response = await client.get(f"/v2/models/{model}/ready")
            assert response.status_code == (200 if ready else 503), model
            assert response.json() == {"name": model, "ready": ready}


async def test_replicas_of_one_backend_each_get_what_they_speak(
    gateway: Any, taps: dict[str, WireTap], digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """One backend, two replicas (Triton and MLServer behind one name, as mid-migration): every
    call answers, each replica in its own encoding, each asked GET /v2 once."""
    images, _ = digits_samples
    endpoints = [taps["triton"].address, taps["mlserver"].address]
    config = _config(
        {"mixed": {"kind": "v2", "url": taps["triton"].url, "endpoints": endpoints}},
        {"digits": _route("mixed")},
    )
    async with gateway(config) as (client, _):
        for _round in range(3):
            answers = await _concurrently(client, images, 8)
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for server, binary in (("triton", True), ("mlserver", False)):
        infers = taps[server].calls("/infer")
        assert infers, f"{server} got no call"
        assert all(s.binary is binary and s.status == 200 for s in infers), infers
        assert len(taps[server].calls("/v2")) == 1, server


async def _concurrently(
    client: httpx.AsyncClient, images: np.ndarray, count: int
) -> list[httpx.Response]:
    return await asyncio.gather(
        *(
            client.post("/v2/models/digits/infer", json=v2_body(images[i : i + 1]))
            for i in range(count)
        )
    )


async def test_a_replica_whose_server_changed_is_asked_again(
    gateway: Any,
    taps: dict[str, WireTap],
    mlserver: MLServerProcess,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    """Triton is replaced by MLServer behind the same address: the binary call it refuses as
    unreadable makes the gateway ask GET /v2 again and resend as JSON; the client sees 200."""
    images, _ = digits_samples
    tap = taps["triton"]
    config = _config({"v2": {"kind": "v2", "url": tap.url}}, {"digits": _route("v2")})
    async with gateway(config) as (client, _):
        before = await _v2(client, "digits", images[:2])
        tap.upstream = mlserver.url
        tap.clear()
        after = await _v2(client, "digits", images[:2])
        np.testing.assert_allclose(after, before, atol=1e-5)
        await _v2(client, "digits", images[:2])
    assert [(s.method, s.path.rsplit("/", 1)[-1], s.binary) for s in tap.seen] == [
        ("POST", "infer", True),  # refused: MLServer cannot read binary tensors
        ("GET", "v2", False),
        ("POST", "infer", False),
        ("POST", "infer", False),
    ]
    assert tap.seen[0].status in (422, 500) and all(s.status == 200 for s in tap.seen[1:])


async def test_a_server_down_at_start_is_asked_when_it_answers(
    gateway: Any, triton: TritonProcess, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """Nothing listens when the gateway starts (its GET /v2 refused), then a proxy whose
    upstream is down (GET /v2 answers 502): neither answer is kept, and once Triton answers
    the next call asks again and sends binary."""
    images, _ = digits_samples
    port = free_port()
    config = _config(
        {"v2": {"kind": "v2", "url": f"http://127.0.0.1:{port}", "retries": 0}},
        {"digits": _route("v2")},
    )
    async with gateway(config) as (client, _):
        tap = WireTap("http://127.0.0.1:9", port=port)  # the discard port: refused
        try:
            response = await client.post("/v2/models/digits/infer", json=v2_body(images[:1]))
            assert response.status_code == 502, response.text
            tap.upstream = triton.url
            await _v2(client, "digits", images[:2])
        finally:
            tap.close()
    wire = [s for s in tap.seen if s.path.endswith(("/v2", "/infer"))]  # no readiness probes
    assert [(s.path.rsplit("/", 1)[-1], s.binary, s.status) for s in wire] == [
        ("v2", False, 502),
        ("infer", False, 502),
        ("v2", False, 200),
        ("infer", True, 200),
    ]


async def test_a_replica_back_from_ejection_is_asked_before_it_takes_calls(
    gateway: Any,
    taps: dict[str, WireTap],
    mlserver: MLServerProcess,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    """Two Triton replicas; one fails and is ejected, and comes back as MLServer: the probe
    that returns it asks GET /v2 on its fresh connections, so its first call is already JSON
    (no refused binary call)."""
    images, _ = digits_samples
    failing, steady = taps["mlserver"], taps["triton"]  # both relay to Triton at first
    triton_url = steady.upstream
    failing.upstream = "http://127.0.0.1:9"  # the discard port: the relay answers 502
    outlier = {"consecutive_failures": 1, "base_ejection_s": 0.2, "max_ejection_s": 1}
    backend = {
        "kind": "v2",
        "url": steady.url,
        "endpoints": [failing.address, steady.address],
        "slow_start_s": 0,
        "outlier": outlier,
    }
    config = _config({"v2": backend}, {"digits": _route("v2")})
    async with gateway(config) as (client, _):
        for _attempt in range(40):  # until the balancer picks the failing replica
            response = await client.post("/v2/models/digits/infer", json=v2_body(images[:1]))
            if response.status_code != 200:
                break
        assert response.status_code == 502, "the failing replica got no call"
        failing.clear()
        failing.upstream = mlserver.url
        await eventually(lambda: failing.calls("/v2") != [], "the returning replica's GET /v2", 10)
        for _round in range(10):
            answers = await _concurrently(client, images, 4)
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            if failing.calls("/infer"):
                break
    # Nothing but the probe called it between the switch and the wait above: the probe asked.
    wire = [s.path for s in failing.seen if not s.path.startswith("/v2/models/digits/ready")]
    first_infer = next(i for i, path in enumerate(wire) if path.endswith("/infer"))
    assert wire[:first_infer][-2:] == ["/v2/health/ready", "/v2"]
    assert all(not s.binary and s.status == 200 for s in failing.calls("/infer"))
    assert triton_url == steady.upstream
