""".ci/run on a machine that lacks Java, Prometheus, nginx and wrk, with apt-get and make
replaced by recorders: what it installs, that no service may start while it does, and that it
stops no process of the machine by name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.servers import REPO

CI = REPO / ".ci" / "run"
# What the script itself runs besides apt-get and make (bash builtins aside).
TOOLS = ("dirname", "chmod", "rm", "cat", "sh")

FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$LOG"
if [ "$1" = install ]; then
  # What invoke-rc.d and deb-systemd-invoke do before a package's maintainer script starts
  # its service: ask policy-rc.d (101: forbidden).
  if [ -x "$POLICY_RC_D" ]; then
    "$POLICY_RC_D" prometheus start
    echo "policy-rc.d prometheus start: $?" >> "$LOG"
  else
    echo "policy-rc.d: none, prometheus started" >> "$LOG"
  fi
fi
"""
FAKE_MAKE = """#!/bin/sh
echo "make $* (policy-rc.d left: $(test -e "$POLICY_RC_D" && echo yes || echo no))" >> "$LOG"
"""


def run_ci(tmp_path: Path, present: tuple[str, ...] = (), policy_exists: bool = False) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    for name, text in (("apt-get", FAKE_APT_GET), ("make", FAKE_MAKE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for name in present:  # already installed
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    policy = tmp_path / "policy-rc.d"
    if policy_exists:
        policy.write_text("#!/bin/sh\nexit 0\n")
        policy.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run(
        [bash, str(CI)],
        env={"PATH": str(bin_dir), "LOG": str(log), "POLICY_RC_D": str(policy)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    if policy_exists:
        assert policy.read_text() == "#!/bin/sh\nexit 0\n"  # the machine's own, untouched
    else:
        assert not policy.exists()  # its own policy is gone once the install is done
    return log.read_text()


def test_ci_installs_what_is_missing_with_service_starts_forbidden(tmp_path: Path) -> None:
    log = run_ci(tmp_path)
    assert "apt-get update -qq" in log
    install = re.search(r"^apt-get install (.*)$", log, re.M)
    assert install is not None
    packages = {"openjdk-17-jre-headless", "prometheus", "nginx-light", "wrk"}
    assert packages <= set(install.group(1).split())
    assert "policy-rc.d prometheus start: 101" in log
    assert log.strip().endswith("make test (policy-rc.d left: no)")


def test_ci_installs_nothing_when_every_tool_is_there(tmp_path: Path) -> None:
    log = run_ci(tmp_path, present=("java", "prometheus", "promtool", "nginx", "wrk"))
    assert log.splitlines() == ["make test (policy-rc.d left: no)"]


def test_ci_leaves_a_policy_the_machine_already_has(tmp_path: Path) -> None:
    log = run_ci(tmp_path, policy_exists=True)
    assert "policy-rc.d prometheus start: 0" in log  # the machine's own decision


def test_ci_stops_no_process_by_name() -> None:
    commands = [line.split("#", 1)[0] for line in CI.read_text().splitlines() if line.strip()]
    assert not [c for c in commands if re.search(r"\b(pkill|killall|kill)\b", c)]
    assert not [c for c in commands if re.search(r"\bsystemctl\b.*\bstop\b", c)]
    assert os.access(CI, os.X_OK)
