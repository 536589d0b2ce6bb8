#!/usr/bin/env python3
"""Container health check for the memsweep image (installed as /usr/local/bin/memsweep-healthcheck).

    memsweep-healthcheck ray-node      the local raylet is alive (every Ray node, head or worker)
    memsweep-healthcheck ray-head      the above, plus the GCS answers (head node only)
    memsweep-healthcheck http URL      URL answers 2xx (the MLflow server: http://127.0.0.1:5000/health)

Standard library only (the image carries no curl/wget). The Ray endpoints are the ones KubeRay's own
probes use, and Ray serves them without a token even when RAY_AUTH_MODE=token; the token is sent
anyway when RAY_AUTH_TOKEN is set, which costs nothing. Exit 0 when healthy, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def _agent_port() -> int:
    return int(os.environ.get("RAY_DASHBOARD_AGENT_LISTEN_PORT", "52365"))


def _dashboard_port() -> int:
    return int(os.environ.get("RAY_DASHBOARD_PORT", "8265"))


def _get(url: str, *, expect_body: str | None = None) -> str | None:
    """Return None when healthy, else a one-line reason."""
    request = urllib.request.Request(url)
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token and "/api/" in url:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (loopback URL)
            body = response.read(4096).decode("utf-8", "replace")
            if not 200 <= response.status < 300:
                return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {err}"
    if expect_body is not None and expect_body not in body:
        return f"{url}: unexpected answer {body[:200]!r}"
    return None


def check(mode: str, args: list[str]) -> str | None:
    if mode == "ray-node":
        return _get(f"http://127.0.0.1:{_agent_port()}/api/local_raylet_healthz", expect_body="success")
    if mode == "ray-head":
        return check("ray-node", []) or _get(
            f"http://127.0.0.1:{_dashboard_port()}/api/gcs_healthz", expect_body="success"
        )
    if mode == "http" and len(args) == 1:
        return _get(args[0])
    return f"usage: {os.path.basename(sys.argv[0])} ray-node | ray-head | http URL"


def main(argv: list[str]) -> int:
    if not argv:
        argv = ["ray-node"]
    problem = check(argv[0], argv[1:])
    if problem is None:
        return 0
    print(f"unhealthy: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
