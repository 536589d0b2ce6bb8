"""The `memsweep` command's surface: help on every argument, a real description, `--version`, `run`
refusing a sweep, `ui tracking=server` printing the server's address instead of starting anything, and
the addresses `status`, `launch` and the report link to. No store, no Ray: each test is under a second
or two (the ones that compose a config pay Hydra's import)."""

from __future__ import annotations

import argparse
import socket

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.links import browse_hint, experiment_url, run_url, server_url


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    assert "The `memsweep` command." not in (parser.description or "")
    assert "memorizes" in parser.description and "memsweep stop" in parser.epilog
    commands = subcommands(parser)
    assert {"run", "launch", "status", "show", "resume", "stop", "aggregate", "report", "ui"} <= set(commands)
    missing = [f"{name} {a.dest}" for name, command in {"memsweep": parser, **commands}.items()
               for a in command._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"arguments without help: {missing}"
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions
    assert all(c.help for c in choices), [c.dest for c in choices if not c.help]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("memsweep ") and len(printed.split()) == 2, printed


@pytest.mark.parametrize("override", ["seed=0,1", "model=glob(l1_*)", "data.num_sequences=range(16,64,16)"])
def test_run_with_several_values_says_to_use_launch(override, memsweep_root, capsys):
    assert main(["run", "model=l1_d16", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "memsweep launch sweep=NAME" in err and override in err and "--multirun" not in err, err
    assert not memsweep_root.exists(), "nothing is recorded before the error"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_on_a_tracking_server_prints_its_address_and_starts_nothing(monkeypatch, capsys):
    port = free_port()  # nothing listens there: `ui` must neither connect nor serve
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}/")
    assert main(["ui", "tracking=server"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"http://127.0.0.1:{port}", captured
    assert "Traceback" not in captured.err and "s3cret" not in captured.out + captured.err
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "ui started a server for a tracking server"


def test_links_point_at_the_server_without_credentials_and_at_memsweep_ui_locally():
    server = "https://bob:pw@mlflow.example.org:8443/prefix/"
    assert server_url(server) == "https://mlflow.example.org:8443/prefix"
    assert experiment_url(server, "7") == "https://mlflow.example.org:8443/prefix/#/experiments/7"
    assert run_url(server, "abc") == "https://mlflow.example.org:8443/prefix/#/runs/abc"
    assert browse_hint(server, None) == "https://mlflow.example.org:8443/prefix"
    local = "sqlite:////tmp/runs/mlflow.db"
    assert experiment_url(local, "7") is None and run_url(local, "abc") is None
    assert "memsweep ui" in browse_hint(local, "7")
    assert run_url(server, None) is None


def test_status_refuses_an_unknown_state_in_one_line(capsys):
    assert main(["status", "smoke", "--state", "finished,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--state finished,bogus" in err and "PENDING" in err, err


@pytest.fixture
def not_an_mlflow_server():
    """A web server on loopback that answers 404 to everything: a tracking URI pointing at the wrong
    service (a real HTTP exchange, not a mock of MLflow's client)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_tracking_failure_is_one_line_naming_the_traceback_file(not_an_mlflow_server, monkeypatch, capsys,
                                                                   caplog):
    """Not retried for minutes (a 4xx cannot heal), not a traceback: one line, exit 1, the traceback
    in the file the line names."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", not_an_mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["status", "smoke", "tracking=server"]) == 1
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "MlflowException" in lines[0] and "404" in lines[0], printed
    path = lines[0].split("the traceback is in ")[1].split(" ")[0]
    with open(path) as f:
        assert "Traceback (most recent call last)" in f.read()
    assert "Traceback" not in printed.out + printed.err
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # failed at the first answer
