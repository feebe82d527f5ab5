"""models.yaml validation: a good file loads; every mistake fails with the offending key's path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from duoserve.config import (
    ConfigError,
    EmbeddedBackendConfig,
    GatewayConfig,
    TFServingBackendConfig,
    TorchServeBackendConfig,
    load_config,
    parse_config,
)
from tests.conftest import embedded_config
from tests.servers import REPO


def _config() -> dict[str, Any]:
    return copy.deepcopy(embedded_config())


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_valid_file_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _config()))
    assert isinstance(config, GatewayConfig)
    assert set(config.models) == {"digits", "digits-pytorch", "digits-tensorflow"}
    digits = config.models["digits"]
    assert [r.framework for r in digits.routes] == ["pytorch", "tensorflow"]
    assert digits.failover is True
    assert digits.inputs[0].shape == [-1, 8, 8]
    backend = config.backends["local"]
    assert isinstance(backend, EmbeddedBackendConfig)
    # Defaults a user relies on without writing them.
    assert backend.timeout_ms == 2000
    assert digits.version == "1"
    assert digits.max_batch == 1024


@pytest.mark.parametrize(
    "path", ["models.yaml", "k8s/base/models.yaml", "deploy/compose/models.yaml"]
)
def test_repository_configs_pass(path: str) -> None:
    config = load_config(REPO / path)
    assert "digits" in config.models


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


def test_unknown_backend_in_route_names_the_route() -> None:
    data = _config()
    data["models"]["digits"]["routes"][1]["backend"] = "torchsrve"
    message = _error(data)
    assert "models.digits.routes.1.backend" in message
    assert "torchsrve" in message
    assert "known: local" in message


def test_unknown_backend_in_shadow_names_the_shadow() -> None:
    data = _config()
    data["models"]["digits"]["shadow"] = {"backend": "nowhere", "framework": "tensorflow"}
    assert "models.digits.shadow.backend" in _error(data)


def test_unknown_datatype() -> None:
    data = _config()
    data["models"]["digits"]["inputs"][0]["datatype"] = "FLOAT32"
    message = _error(data)
    assert "models.digits.inputs.0.datatype" in message
    assert "unknown datatype 'FLOAT32'" in message
    assert "FP32" in message  # says what to use instead


@pytest.mark.parametrize("dim", [0, -2])
def test_bad_shape_dimension(dim: int) -> None:
    data = _config()
    data["models"]["digits-pytorch"]["outputs"][0]["shape"] = [-1, dim]
    message = _error(data)
    assert "models.digits-pytorch.outputs.0.shape" in message
    assert "-1 for variable" in message


def test_zero_total_weight() -> None:
    data = _config()
    for route in data["models"]["digits"]["routes"]:
        route["weight"] = 0
    message = _error(data)
    assert "models.digits" in message
    assert "weight above 0" in message


def test_negative_weight() -> None:
    data = _config()
    data["models"]["digits"]["routes"][0]["weight"] = -1
    assert "models.digits.routes.0.weight" in _error(data)


def test_duplicate_input() -> None:
    data = _config()
    spec = data["models"]["digits"]["inputs"][0]
    data["models"]["digits"]["inputs"].append(dict(spec))
    message = _error(data)
    assert "models.digits" in message
    assert "'pixels' is declared twice" in message


def test_torchserve_backend_without_url() -> None:
    data = _config()
    data["backends"]["ts"] = {"kind": "torchserve"}
    message = _error(data)
    # The path is the user's own keys; pydantic's union tag ("torchserve") is not one of them.
    assert "backends.ts.url: Field required" in message


def test_tfserving_grpc_without_address() -> None:
    data = _config()
    data["backends"]["tf"] = {"kind": "tfserving", "url": "http://tfserving:8501"}
    message = _error(data)
    assert "backends.tf" in message
    assert "needs 'grpc: host:port'" in message


def test_tfserving_rest_needs_only_url() -> None:
    data = _config()
    data["backends"]["tf"] = {"kind": "tfserving", "protocol": "rest", "url": "http://tf:8501"}
    backend = parse_config(data).backends["tf"]
    assert isinstance(backend, TFServingBackendConfig)
    assert backend.protocol == "rest"


def test_unknown_backend_kind() -> None:
    data = _config()
    data["backends"]["odd"] = {"kind": "onnx"}
    assert "backends.odd" in _error(data)


def test_unknown_framework() -> None:
    data = _config()
    data["models"]["digits"]["routes"][0]["framework"] = "jax"
    assert "models.digits.routes.0.framework" in _error(data)


@pytest.mark.parametrize(
    ("where", "key"),
    [
        (("models", "digits"), "colour"),
        (("backends", "local"), "gpus"),
        ((), "extras"),
    ],
)
def test_unknown_extra_key(where: tuple[str, ...], key: str) -> None:
    data = _config()
    target = data
    for part in where:
        target = target[part]
    target[key] = 1
    message = _error(data)
    assert ".".join((*where, key)) in message
    assert "not permitted" in message


def test_every_problem_is_listed() -> None:
    data = _config()
    data["models"]["digits"]["inputs"][0]["datatype"] = "FLOAT32"
    data["models"]["digits-pytorch"]["outputs"][0]["shape"] = [0]
    message = _error(data)
    assert "models.digits.inputs.0.datatype" in message
    assert "models.digits-pytorch.outputs.0.shape" in message


def test_top_level_not_a_mapping() -> None:
    assert "top level must be a mapping" in _error(["backends"])


def test_missing_models_section() -> None:
    data = _config()
    del data["models"]
    assert "models" in _error(data)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("backends:\n  local: {kind: embedded\nmodels: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path)
    assert "nowhere.yaml" in str(caught.value)


def test_error_names_the_file(tmp_path: Path) -> None:
    data = _config()
    data["models"]["digits"]["failover"] = "perhaps"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "models.digits.failover" in str(caught.value)


# -- replicas (endpoints, resolution, balancing, ejection) -----------------------------------


def test_replica_settings_have_documented_defaults() -> None:
    data = _config()
    data["backends"]["ts"] = {"kind": "torchserve", "url": "http://torchserve:8080"}
    backend = parse_config(data).backends["ts"]
    assert isinstance(backend, TorchServeBackendConfig)
    assert backend.endpoints is None
    assert (backend.resolve_interval_s, backend.slow_start_s) == (5.0, 10.0)
    outlier = backend.outlier
    assert (outlier.consecutive_failures, outlier.base_ejection_s) == (5, 1.0)
    assert (outlier.max_ejection_s, outlier.max_ejected_percent) == (30.0, 50)


def test_tfserving_grpc_may_list_its_replicas_instead_of_an_address() -> None:
    data = _config()
    data["backends"]["tf"] = {
        "kind": "tfserving",
        "endpoints": ["tfserving-0.tfserving:8500", "10.0.0.7:8500", "[fd00::7]:8500"],
        "outlier": {"consecutive_failures": 3},
    }
    backend = parse_config(data).backends["tf"]
    assert isinstance(backend, TFServingBackendConfig)
    assert backend.endpoints == ["tfserving-0.tfserving:8500", "10.0.0.7:8500", "[fd00::7]:8500"]
    assert backend.outlier.consecutive_failures == 3


@pytest.mark.parametrize(
    ("backend", "where", "words"),
    [
        ({"endpoints": ["torchserve"]}, "backends.ts.endpoints.0", "should match pattern"),
        ({"endpoints": ["http://ts:8080"]}, "backends.ts.endpoints.0", "should match pattern"),
        ({"endpoints": ["ts:99999"]}, "backends.ts.endpoints", "between 1 and 65535"),
        ({"endpoints": ["ts:8080", "ts:8080"]}, "backends.ts.endpoints", "listed twice"),
        ({"endpoints": []}, "backends.ts.endpoints", "at least 1 item"),
        ({"resolve_interval_s": 0}, "backends.ts.resolve_interval_s", "greater than 0"),
        ({"slow_start_s": -1}, "backends.ts.slow_start_s", "greater than or equal to 0"),
        ({"outlier": {"consecutive_failures": 0}}, "backends.ts.outlier.consecutive_failures",
         "greater than or equal to 1"),
        ({"outlier": {"max_ejected_percent": 120}}, "backends.ts.outlier.max_ejected_percent",
         "less than or equal to 100"),
        ({"outlier": {"base_ejection_s": 10, "max_ejection_s": 5}}, "backends.ts.outlier",
         "max_ejection_s must be at least base_ejection_s"),
        ({"outlier": {"eject_after": 3}}, "backends.ts.outlier.eject_after", "Extra inputs"),
    ],
)  # fmt: skip
def test_bad_replica_settings_name_their_key(
    backend: dict[str, Any], where: str, words: str
) -> None:
    data = _config()
    data["backends"]["ts"] = {"kind": "torchserve", "url": "http://torchserve:8080", **backend}
    message = _error(data)
    assert f"{where}:" in message and words in message, message
