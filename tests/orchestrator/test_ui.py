"""`memsweep ui` serves the tracking store on 127.0.0.1 only, without MLflow's job runner."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_pids(pgid: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.add(int(entry))
            except ProcessLookupError:
                pass
    return pids


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
        return 0


def test_ui_answers_on_loopback_only(memsweep_root, tmp_path):
    port = free_port()
    log = open(tmp_path / "ui.log", "w+")
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], cwd=tmp_path,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"})
    try:
        deadline, answered = time.monotonic() + 120, False
        while time.monotonic() < deadline and not answered:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    answered = response.status == 200
            except OSError:
                assert ui.poll() is None, (log.seek(0), log.read())[1]
                time.sleep(0.5)
        assert answered, "memsweep ui did not answer in 120 s"
        pids = group_pids(ui.pid)
        listening = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
        ours = [line.split()[3] for line in listening.splitlines()
                if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]
        assert ours and all(address == f"127.0.0.1:{port}" for address in ours), ours
        # no job runner and one worker: memsweep, `mlflow ui` and its uvicorn (measured: 3 processes,
        # about 570 MB of RSS, against 15 processes and 3 GB with MLflow's defaults)
        assert len(pids) <= 3, sorted(pids)
        assert sum(rss_bytes(pid) for pid in pids) < 1.2e9
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(5)
