"""Atomic, checked checkpoints on any filesystem pyarrow opens (a local folder, s3://, gs://, hdfs://).

Layout under the storage root, one folder per cell:

    <root>/<cell_id>/step-000001000/state.pt     model, optimizer, step, RNG states, history, cell id
    <root>/<cell_id>/step-000001000/COMPLETE     written last: only folders holding it count

On a local disk a checkpoint is written into a temporary folder, moved to `step-N`, then marked
COMPLETE. Object stores have no directory move (and each object appears whole or not at all), so there
the state is written straight into `step-N`; either way only the COMPLETE marker, written last, makes
a checkpoint count. A URI's query (`s3://b/p?endpoint_override=HOST:PORT&scheme=http`) configures the
filesystem and is not part of the path; credentials come from the environment (AWS_ACCESS_KEY_ID, ...). The latest two complete
checkpoints are kept. Loading uses torch.load's weights-only mode, and refuses another cell's state.
"""

from __future__ import annotations

import io
import re
import uuid

import pyarrow.fs as pafs
import torch

from models.storage import open_storage

STEP_DIR = re.compile(r"^step-(\d{9})$")
MARKER = "COMPLETE"
KEEP = 2


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    """Every RNG state of this process that training may draw from: torch's CPU generator, and each
    GPU's when there are GPUs. (The batch order has generators of its own, keyed by the seed.)"""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the process's RNG states to what `rng_state()` returned (GPU states only where there are
    GPUs: a checkpoint written on a GPU machine resumes on a CPU)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """The checkpoints of one cell."""

    def __init__(self, root_uri: str, cell_id: str):
        self.fs, root = open_storage(root_uri)
        self.cell_id = cell_id
        self.dir = f"{root.rstrip('/')}/{cell_id}"

    def _complete_steps(self) -> list[int]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        except FileNotFoundError:
            return []
        steps = []
        for info in infos:
            match = STEP_DIR.match(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                marker = self.fs.get_file_info(f"{info.path}/{MARKER}")
                if marker.type == pafs.FileType.File:
                    steps.append(int(match.group(1)))
        return sorted(steps)

    def save(self, step: int, state: dict) -> None:
        """Write `state` as the checkpoint of `step`, atomically, and prune old ones."""
        buffer = io.BytesIO()
        torch.save({**state, "cell_id": self.cell_id, "step": step}, buffer)
        final = f"{self.dir}/step-{step:09d}"
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            self.fs.delete_dir(final)  # an incomplete leftover of a crashed save of the same step
        if self.fs.type_name == "local":
            tmp = f"{self.dir}/.tmp-step-{step:09d}-{uuid.uuid4().hex[:8]}"
            self.fs.create_dir(tmp, recursive=True)
            with self.fs.open_output_stream(f"{tmp}/state.pt") as out:
                out.write(buffer.getvalue())
            self.fs.move(tmp, final)
        else:
            # Object stores (s3, gcs, ...) cannot move a directory (pyarrow copies single keys only),
            # but each object is written whole: write in place; the marker below still comes last.
            self.fs.create_dir(final, recursive=True)
            with self.fs.open_output_stream(f"{final}/state.pt") as out:
                out.write(buffer.getvalue())
        with self.fs.open_output_stream(f"{final}/{MARKER}") as out:
            out.write(b"ok\n")
        self._prune()

    def _prune(self) -> None:
        for step in self._complete_steps()[:-KEEP]:
            self.fs.delete_dir(f"{self.dir}/step-{step:09d}")
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        for info in infos:
            if info.base_name.startswith(".tmp-step-"):
                self.fs.delete_dir(info.path)

    def latest_step(self) -> int | None:
        steps = self._complete_steps()
        return steps[-1] if steps else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """The latest complete checkpoint's state, or None when the cell has none."""
        step = self.latest_step()
        if step is None:
            return None
        with self.fs.open_input_file(f"{self.dir}/step-{step:09d}/state.pt") as f:
            state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
        if state.get("cell_id") != self.cell_id:
            raise CheckpointError(
                f"checkpoint {self.dir}/step-{step:09d} belongs to cell {state.get('cell_id')!r}, "
                f"not {self.cell_id!r}"
            )
        return state
