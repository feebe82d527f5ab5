"""Every curl example of the README, run exactly as written with the real `curl` against a
gateway serving `make run`'s models.yaml on a free port; only host:port is substituted. Each
answer is checked for what the README says it shows."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.servers import REPO, Gateway

pytestmark = pytest.mark.integration

README = (REPO / "README.md").read_text(encoding="utf-8")
BASE = "http://127.0.0.1:8000"  # what `make run` listens on, as the README writes it
CURL = shutil.which("curl")


def sh_commands(markdown: str) -> list[list[str]]:
    """The commands of every ```sh block, split as the shell would (quotes spanning lines,
    backslash continuations, comments dropped)."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, re.M | re.S):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote is still open: the command goes on
                continue
            pending = ""
            if words:
                commands.append(words)
        assert not pending, f"unterminated command in the README: {pending[:80]}"
    return commands


def curl_examples() -> list[list[str]]:
    return [words for words in sh_commands(README) if words[0] == "curl"]


def url_of(words: list[str]) -> str:
    (url,) = [w for w in words if w.startswith(BASE)]
    return url


def run_curl(words: list[str], base: str, cwd: Path) -> str:
    assert CURL is not None, "the README's examples need curl"
    # Only host:port changes; everything else is the README's own text.
    command = [CURL, *(w.replace(BASE, base, 1) if w.startswith(BASE) else w for w in words[1:])]
    # Bytes: text mode would turn the \r\n of `curl -i` headers into \n.
    result = subprocess.run(command, cwd=cwd, capture_output=True, timeout=60)
    assert result.returncode == 0, f"{shlex.join(words)[:120]}: curl said {result.stderr!r}"
    return result.stdout.decode()


def split_response(text: str) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of ``curl -i`` output."""
    head, _, body = text.partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def check_v2_infer(text: str) -> str:
    # "The answer's largest probability is at index 0 (the image is a zero); the header
    # x-duoserve-framework says which framework served it."
    status, headers, body = split_response(text)
    assert status == 200, body
    assert headers["x-duoserve-framework"] in ("pytorch", "tensorflow")
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [1, 10]
    assert argmax(output["data"]) == 0
    return headers["x-duoserve-framework"]


def check_tfserving(text: str) -> None:
    (row,) = json.loads(text)["predictions"]
    assert len(row) == 10 and argmax(row) == 0


def check_torchserve(text: str) -> None:
    (row,) = json.loads(text)
    assert len(row) == 10 and argmax(row) == 0


def check_compare(text: str) -> None:
    # "every route, its latency, and how far they agree"
    report = json.loads(text)
    assert {r["framework"] for r in report["results"]} == {"pytorch", "tensorflow"}
    for result in report["results"]:
        assert "error" not in result, result
        assert result["latency_ms"] >= 0
        assert argmax(result["outputs"][0]["data"]) == 0
    (pair,) = report["agreement"]
    assert pair["rows"] == 1 and pair["argmax_agree"] == 1
    assert pair["max_abs_diff"] < 1e-4


CHECKS: dict[str, Callable[[str], object]] = {
    "/v2/models/digits/infer": check_v2_infer,
    "/v1/models/digits:predict": check_tfserving,
    "/predictions/digits": check_torchserve,
    "/v2/models/digits/compare": check_compare,
}


@pytest.fixture(scope="module")
def make_run_gateway(v2_server: Gateway) -> Gateway:
    """`duoserve serve` with the repository's models.yaml, what `make run` serves."""
    assert v2_server.config == REPO / "models.yaml"
    return v2_server


def test_the_readme_has_the_curl_examples_this_test_knows() -> None:
    # A new example fails here until its answer is checked below.
    assert sorted(urlsplit(url_of(words)).path for words in curl_examples()) == sorted(CHECKS)


def test_every_curl_example_answers_as_the_readme_says(
    make_run_gateway: Gateway, tmp_path: Path
) -> None:
    examples = curl_examples()
    # request.json, "your own data" for /compare: the V2 body of the README's first example.
    (first,) = [w for w in examples if urlsplit(url_of(w)).path == "/v2/models/digits/infer"]
    (tmp_path / "request.json").write_text(first[first.index("-d") + 1])
    for words in examples:
        path = urlsplit(url_of(words)).path
        CHECKS[path](run_curl(words, make_run_gateway.url, tmp_path))


def test_the_first_example_with_the_readme_s_pin_and_route_key_headers(
    make_run_gateway: Gateway, tmp_path: Path
) -> None:
    pin, route_key = re.findall(r"Add `(-H '[^`]+')`\s+to pin one, or `(-H '[^`]+')`", README)[0]
    (first,) = [w for w in curl_examples() if "-i" in w]
    pinned = run_curl(first + shlex.split(pin), make_run_gateway.url, tmp_path)
    assert check_v2_infer(pinned) == shlex.split(pin)[1].split(":")[1].strip()
    # 50/50 split: eight answers from one framework by chance would be 1 in 128.
    served = {
        check_v2_infer(run_curl(first + shlex.split(route_key), make_run_gateway.url, tmp_path))
        for _ in range(8)
    }
    assert len(served) == 1


def test_the_readme_names_every_tf_serving_metric_only_the_stand_in_produced() -> None:
    # The dashboards' TF Serving series were seen from the stand-in only: the README says so.
    used = set()
    for dashboard in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json"):
        used |= set(re.findall(r":tensorflow:serving:[a-z_:]+", dashboard.read_text()))
    histograms = {name.removesuffix("_bucket") for name in used if name.endswith("_bucket")}
    families = {
        base if (base := re.sub(r"_(bucket|count|sum)$", "", name)) in histograms else name
        for name in used
    }
    assert families  # the TF Serving row exists
    (note,) = [p for p in README.split("\n- ") if p.startswith("**TF Serving metrics**")]
    assert "tests/tfserving_standin/metrics.py" in note
    assert sorted(f for f in families if f"`{f}`" not in note) == []
