"""Checkpoints on s3:// through pyarrow, against the S3 emulator (the real protocol over HTTP)."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import CheckpointStore


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def test_checkpoints_on_s3_with_endpoint_in_the_uri(s3_env):
    root = s3_env.uri("memsweep/ckpt-test")  # s3://memsweep/ckpt-test?endpoint_override=...&scheme=http
    store = CheckpointStore(root, "cell-a")
    assert store.dir == "memsweep/ckpt-test/cell-a"  # the query configures the filesystem, not the path
    assert store.load_latest() is None
    for step in (10, 20, 30):
        store.save(step, {"weights": torch.full((3,), float(step))})
    state = CheckpointStore(root, "cell-a").load_latest()
    assert state["step"] == 30 and torch.equal(state["weights"], torch.full((3,), 30.0))
    keys = s3_env.keys("memsweep", "ckpt-test/cell-a/")
    assert {k.split("/")[2] for k in keys if k.endswith("/COMPLETE")} == {"step-000000020", "step-000000030"}


def test_checkpoints_on_s3_with_endpoint_from_the_environment(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)  # pyarrow 25 reads it, as the compose stack sets it
    store = CheckpointStore("s3://memsweep/ckpt-env", "cell-b")
    store.save(5, {"weights": torch.ones(2)})
    assert CheckpointStore("s3://memsweep/ckpt-env", "cell-b").latest_step() == 5
