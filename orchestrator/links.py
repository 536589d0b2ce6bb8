"""Where a user browses a sweep: MLflow UI addresses of experiments and runs, or how to serve a local store.

A tracking server (`tracking=server`, an http(s) URI) serves MLflow's UI itself, so every experiment and
run has an address: `status`, `launch` and the report print or link them. A local store (SQLite under
the run folder) has none until `memsweep ui` serves it; then the same paths hold under its address.
Nothing here talks to MLflow: these are strings built from the tracking URI.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

DEFAULT_UI = "http://127.0.0.1:5000"  # what `memsweep ui` serves a local store on by default


def is_server(uri: str) -> bool:
    """A tracking URI that MLflow's UI answers on (an MLflow tracking server)."""
    return uri.startswith(("http://", "https://"))


def server_url(uri: str) -> str:
    """The server's address as a browser needs it: no credentials, no trailing slash."""
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]  # user:password@ never goes into a printed or linked address
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def experiment_url(uri: str, experiment_id: str | None) -> str | None:
    """The experiment's page on a tracking server; None for a local store or an unknown experiment."""
    if not is_server(uri) or experiment_id is None:
        return None
    return f"{server_url(uri)}/#/experiments/{experiment_id}"


def run_url(uri: str, run_id: str | None) -> str | None:
    """A run's page on a tracking server (MLflow's UI redirects /#/runs/ID to its experiment's page)."""
    if not is_server(uri) or not run_id:
        return None
    return f"{server_url(uri)}/#/runs/{run_id}"


def browse_hint(uri: str, experiment_id: str | None = None) -> str:
    """One line saying where to browse the store: the experiment's (or server's) URL, or `memsweep ui`."""
    if is_server(uri):
        return experiment_url(uri, experiment_id) or server_url(uri)
    return f"{uri} (local store: `memsweep ui` serves it at {DEFAULT_UI})"
