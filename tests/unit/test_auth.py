"""API keys: the keys file, the middleware's 401/403/429 matrix, open health and metrics, and
the `duoserve keys` commands, on an in-process gateway over the embedded digits models."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from duoserve.auth import KeyFileError, KeyRing, TokenBucket, classify, hash_key, parse_keys_file
from tests.conftest import GatewayFactory, v2_body
from tests.servers import VENV_BIN

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

IMAGE = (np.arange(64, dtype=np.float32) % 17).reshape(1, 8, 8)
ADMIN, APP, OTHER, LIMITED = "dsk_admin-key", "dsk_app-key", "dsk_other-key", "dsk_limited-key"


def write_keys(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "ops", "sha256": hash_key(ADMIN), "scopes": ["admin"]},
                    {"name": "app", "sha256": hash_key(APP), "models": ["digits"]},
                    {"name": "other", "sha256": hash_key(OTHER), "models": ["digits-pytorch"]},
                    {
                        "name": "limited",
                        "sha256": hash_key(LIMITED).upper(),  # hex case does not matter
                        "models": "*",
                        "rate_per_s": 0.5,
                        "burst": 3,
                    },
                ]
            }
        )
    )
    return path


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- the keys file ----------------------------------------------------------------------------


def test_keys_file_yaml_json_and_errors(tmp_path: Path) -> None:
    entries = parse_keys_file(write_keys(tmp_path / "keys.yaml"))
    assert [e.name for e in entries] == ["ops", "app", "other", "limited"]
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps([{"name": "a", "sha256": hash_key("x")}]))
    ring = KeyRing.load(as_json)
    found = ring.find("x")
    assert found is not None and found.scopes == {"infer"} and found.models is None
    assert ring.find("y") is None

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"name": "a", "sha256": "not-a-digest"}]))
    with pytest.raises(KeyFileError, match=r"keys\.0: sha256"):
        parse_keys_file(bad)
    bad.write_text(yaml.safe_dump([{"name": "a", "sha256": hash_key("k"), "scopes": ["root"]}]))
    with pytest.raises(KeyFileError, match=r"keys\.0: scopes"):
        parse_keys_file(bad)
    bad.write_text(
        yaml.safe_dump(
            [{"name": "a", "sha256": hash_key("k")}, {"name": "b", "sha256": hash_key("k")}]
        )
    )
    with pytest.raises(KeyFileError, match="listed twice"):
        parse_keys_file(bad)
    with pytest.raises(KeyFileError, match="cannot read"):
        parse_keys_file(tmp_path / "missing.yaml")


def test_the_file_never_holds_a_usable_key(tmp_path: Path) -> None:
    text = write_keys(tmp_path / "keys.yaml").read_text()
    for key in (ADMIN, APP, OTHER, LIMITED):
        assert key not in text


def test_token_bucket_allows_the_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=2)
    assert bucket.take() == 0 and bucket.take() == 0
    wait = bucket.take()
    assert 0.05 < wait <= 0.1
    time.sleep(wait + 0.01)
    assert bucket.take() == 0


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/health/ready", ("health", None)),
        ("/ping", ("health", None)),
        ("/metrics", ("metrics", None)),
        ("/v2/models/digits/infer", ("infer", "digits")),
        ("/v2/models/digits/versions/1/infer", ("infer", "digits")),
        ("/v2/models/digits/compare", ("admin", "digits")),
        ("/v2/models/digits", ("infer", "digits")),
        ("/v1/models/digits:predict", ("infer", "digits")),
        ("/v1/models/digits/labels/stable:predict", ("infer", "digits")),
        ("/predictions/digits/2", ("infer", "digits")),
        ("/v2/models", ("other", None)),
        ("/openapi.json", ("other", None)),
    ],
)
def test_classify_paths(path: str, expected: tuple[str, str | None]) -> None:
    assert classify(path) == expected


# -- the middleware, in-process -----------------------------------------------------------------


async def test_auth_matrix(gateway: GatewayFactory, tmp_path: Path) -> None:
    keys = str(write_keys(tmp_path / "keys.yaml"))
    body = v2_body(IMAGE)
    async with gateway(api_keys_file=keys) as (client, _):
        none = await client.post("/v2/models/digits/infer", json=body)
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == "Bearer"
        assert "API key is required" in none.json()["error"]

        wrong = await client.post("/v2/models/digits/infer", json=body, headers=bearer("dsk_no"))
        assert wrong.status_code == 401 and wrong.json() == {"error": "the API key is not valid"}

        ok = await client.post("/v2/models/digits/infer", json=body, headers=bearer(APP))
        assert ok.status_code == 200
        via_header = await client.post(
            "/v1/models/digits:predict",
            json={"instances": IMAGE.tolist()},
            headers={"x-api-key": APP},
        )
        assert via_header.status_code == 200

        # A model the key was not granted: 403, on every front door, whether it exists or not.
        for path, payload in [
            ("/v2/models/digits-tensorflow/infer", body),
            ("/v1/models/digits-tensorflow:predict", {"instances": IMAGE.tolist()}),
            ("/v2/models/no-such-model/infer", body),
        ]:
            denied = await client.post(path, json=payload, headers=bearer(APP))
            assert denied.status_code == 403, path
            assert "may not use model" in denied.json()["error"]
        # TorchServe's paths answer in TorchServe's error shape.
        ts = await client.post(
            "/predictions/digits-tensorflow", json=IMAGE.tolist(), headers=bearer(APP)
        )
        assert ts.status_code == 403
        assert ts.json()["code"] == 403 and ts.json()["type"] == "Forbidden"
        ts_none = await client.post("/predictions/digits", json=IMAGE.tolist())
        assert (ts_none.status_code, ts_none.json()["code"]) == (401, 401)

        # compare needs the admin scope.
        compare = await client.post("/v2/models/digits/compare", json=body, headers=bearer(APP))
        assert compare.status_code == 403 and "admin" in compare.json()["error"]
        compare = await client.post("/v2/models/digits/compare", json=body, headers=bearer(ADMIN))
        assert compare.status_code == 200
        assert {r["framework"] for r in compare.json()["results"]} == {"pytorch", "tensorflow"}

        # Other endpoints need a valid key of any scope; health and metrics are open by default.
        assert (await client.get("/v2/models")).status_code == 401
        assert (await client.get("/v2/models", headers=bearer(OTHER))).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 401
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/ping")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200

        # Management paths of the backends do not exist here, even for an admin key.
        for method, path in [
            ("GET", "/models"),
            ("POST", "/models?url=http://evil/x.mar"),
            ("PUT", "/models/digits?min_worker=3"),
            ("DELETE", "/models/digits/1"),
            ("GET", "/token"),
            ("GET", "/api-description"),
            ("POST", "/workflows?url=x.war"),
            ("POST", "/v2/repository/models/digits/load"),
        ]:
            answer = await client.request(method, path, headers=bearer(ADMIN))
            assert answer.status_code == 404, (method, path)


async def test_closed_health_and_metrics_need_a_key(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    keys = str(write_keys(tmp_path / "keys.yaml"))
    async with gateway(api_keys_file=keys, open_health=False, open_metrics=False) as (client, _):
        for path in ("/v2/health/ready", "/v2/health/live", "/ping", "/metrics"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=bearer(OTHER))).status_code == 200, path


async def test_rate_limit_answers_429_with_retry_after_past_the_burst(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    keys = str(write_keys(tmp_path / "keys.yaml"))
    body = v2_body(IMAGE)
    async with gateway(api_keys_file=keys) as (client, _):
        codes = []
        for _ in range(5):
            answer = await client.post(
                "/v2/models/digits/infer", json=body, headers=bearer(LIMITED)
            )
            codes.append(answer.status_code)
        assert codes == [200, 200, 200, 429, 429]  # burst 3, then 0.5/s
        assert int(answer.headers["retry-after"]) == 2
        assert "rate limit" in answer.json()["error"]
        # Another key has its own bucket.
        other = await client.post("/v2/models/digits/infer", json=body, headers=bearer(APP))
        assert other.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'duoserve_shed_requests_total{model="digits",reason="rate_limit"} 2.0' in metrics


async def test_without_a_keys_file_nothing_is_asked(gateway: GatewayFactory) -> None:
    async with gateway() as (client, _):
        answer = await client.post("/v2/models/digits/infer", json=v2_body(IMAGE))
        assert answer.status_code == 200


# -- the commands -------------------------------------------------------------------------------


def _duoserve(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "duoserve"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_keys_hash_and_new(tmp_path: Path) -> None:
    hashed = _duoserve("keys", "hash", stdin="my-key\n")
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_key("my-key")

    made = _duoserve("keys", "new", "--name", "shop", "--models", "digits", "--rate", "5")
    assert made.returncode == 0
    key = made.stdout.splitlines()[0].rsplit(" ", 1)[1]
    entry_text = made.stdout.split("DUOSERVE_API_KEYS_FILE):\n", 1)[1]
    path = tmp_path / "keys.yaml"
    path.write_text(entry_text)
    ring = KeyRing.load(path)
    found = ring.find(key)
    assert found is not None and found.name == "shop" and found.models == {"digits"}
    assert found.bucket is not None and found.bucket.rate == 5
    assert _duoserve("keys", "new").stdout != made.stdout  # random every time
