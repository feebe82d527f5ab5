"""Checks `make up` runs before docker compose: what compose would not catch until a container
fails.

Compose bind-mounts a file secret with the host file's owner and mode (it ignores uid, gid and
mode for file secrets), so a keys file of mode 0600 owned by the host user is unreadable to the
gateway, which runs as uid/gid 10001: the gateway would exit at start. Standard library only.

    python deploy/compose/preflight.py        # exit 1 with what to do, or 0
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

# USER of services/gateway/Dockerfile (tests/deploy holds the two equal).
GATEWAY_UID = 10001
GATEWAY_GID = 10001
REQUIRED = ("GRAFANA_ADMIN_PASSWORD", "DUOSERVE_API_KEYS_PATH")


def readable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of uid/gid (no supplementary groups, no capabilities) may read path."""
    info = path.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def problems(env: dict[str, str]) -> list[str]:
    found = [f"set {name}" for name in REQUIRED if not env.get(name)]
    keys = env.get("DUOSERVE_API_KEYS_PATH")
    if not keys:
        return found
    path = Path(keys)
    if not path.is_file():
        found.append(f"DUOSERVE_API_KEYS_PATH={keys} is not a file")
    elif not readable_by(path, GATEWAY_UID, GATEWAY_GID):
        mode = stat.S_IMODE(path.stat().st_mode)
        found.append(
            f"the gateway (uid {GATEWAY_UID}) cannot read {keys} (mode {mode:04o}): it holds "
            f"SHA-256 digests only, so `chmod 0644 {keys}`, or `chgrp {GATEWAY_GID} {keys}` "
            f"and `chmod 0640 {keys}`"
        )
    return found


def main() -> int:
    found = problems(dict(os.environ))
    for problem in found:
        print(f"make up: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
