"""Faults with real processes: kill -9 during a checkpoint save, two runs on one folder, a full
disk (a write wrapper always; a real tmpfs where the test may mount one)."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmid.errors import FastmidError
from fastmid.train import checkpoint as checkpoint_module
from fastmid.train.checkpoint import (
    CheckpointError,
    clean_partial_checkpoints,
    list_checkpoints,
    resolve_resume,
)
from fastmid.train.runfolder import (
    RunLockedError,
    RunLockError,
    acquire_run_lock,
    clear_run_folder,
)

# Runs in the test process (exec) and in each child: a tiny model trained `step` steps, saved.
TINY_RUN = r"""
import torch
from fastmid.train.checkpoint import TrainerState, capture_rng, load_checkpoint, save_checkpoint


def tiny(step, width=16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(step):
        opt.zero_grad()
        model(torch.randn(2, width)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, [n for n, _ in model.named_parameters()], opt, sched


def save(ckdir, step, width=16, keep_last=5):
    model, names, opt, sched = tiny(step, width)
    state = TrainerState(step, step, 0, 0, 0.0, capture_rng(), {}, {})
    return save_checkpoint(ckdir, model, names, opt, sched, state, keep_last)


def load(path, width=16):
    model, names, opt, sched = tiny(0, width)
    state = load_checkpoint(path, model, names, opt, sched)
    return state, model
"""
TINY: dict = {}
exec(TINY_RUN, TINY)

# One real child process pays torch's start-up (importing torch and the optimizers' dynamo guard
# take seconds on 2 cores) once, then forks one saver per kill point; the test kills each saver
# with SIGKILL while it is paused inside save_checkpoint, and the parent reports how each ended.
SAVERS = (
    TINY_RUN
    + r"""
import json, os, sys
torch.set_num_threads(1)
tiny(1)  # warm: every import done before forking
jobs = json.loads(sys.argv[1])
pids = {}
for point, ckdir, step in jobs:
    pid = os.fork()
    if pid == 0:
        os.environ["FASTMID_TEST_PAUSE_SAVE"] = point
        try:
            save(ckdir, step)
        finally:
            os._exit(3)  # reached only if the save never paused
    pids[pid] = point
for _ in jobs:
    pid, status = os.wait()
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    # one write(2), as pause_point does: print() may split text and newline into two writes,
    # and a paused saver's line could land between them on the shared pipe
    os.write(2, f"saver {pids[pid]} ended: signal {signum}\n".encode())
"""
)


def _child_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


class Lines:
    """A child's stderr, line by line, with a timeout (select() on the raw pipe, so no line sits
    unseen in a Python buffer)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.buffer, self.seen = proc, b"", []

    def next_line(self, deadline: float) -> str:
        """The next line; fails with what the child printed at ``deadline`` or if it exited."""
        fd = self.proc.stderr.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], left)[0] if left > 0 else []
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:  # timed out, or the child exited
                self.proc.kill()
                pytest.fail("child stopped early or hangs; stderr:\n" + "\n".join(self.seen))
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        self.seen.append(raw.decode(errors="replace"))
        return self.seen[-1]

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        """The next line containing ``needle`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while needle not in (line := self.next_line(deadline)):
            pass
        return line


# kill point -> the checkpoint that must be the latest complete one afterwards
KILL_POINTS = {
    "band.safetensors": "step-1",
    "optimizer.safetensors": "step-1",
    "optimizer.json": "step-1",
    "trainer_state.json": "step-1",
    ":synced": "step-1",  # everything written and fsynced, not yet renamed
    ":moved-aside": "step-1",  # a re-save of step-1: the old one moved aside, the new not in place
    ":renamed": "step-2",  # renamed, parent not yet fsynced: the new checkpoint is complete
}


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """A real process saving step-2 is killed with SIGKILL at each point of the save; the next
    start cleans the partial folder, `latest` is the last complete checkpoint and it loads."""
    jobs = []
    for i, point in enumerate(KILL_POINTS):
        ckdir = tmp_path / f"run{i}" / "checkpoints"
        TINY["save"](ckdir, 1)
        jobs.append([point, str(ckdir), 1 if point == ":moved-aside" else 2])
    server = subprocess.Popen(
        [sys.executable, "-c", SAVERS, json.dumps(jobs)],
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    lines = Lines(server)
    try:
        paused, ended = set(), {}
        deadline = time.monotonic() + 60
        while len(ended) < len(jobs):
            line = lines.next_line(deadline)
            if match := re.search(r"paused at (\S+) \(pid (\d+)\)$", line):
                os.kill(int(match.group(2)), signal.SIGKILL)
                paused.add(match.group(1))
            elif match := re.search(r"^saver (\S+) ended: (.*)$", line):
                ended[match.group(1)] = match.group(2)
        assert paused == set(KILL_POINTS)
        assert ended == dict.fromkeys(KILL_POINTS, "signal 9")
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()

    for point, ckdir_name, _ in jobs:
        ckdir = Path(ckdir_name)
        expected = KILL_POINTS[point]
        partial = [p for p in ckdir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert bool(partial) == (point != ":renamed"), (point, partial)
        if point != ":moved-aside":  # a partial folder is never taken for a checkpoint
            assert resolve_resume("latest", ckdir.parent).name == expected, point
        removed = clean_partial_checkpoints(ckdir)  # what the next start or resume does
        assert sorted(removed) == sorted(partial), point
        assert [p.name for p in ckdir.iterdir() if "." in p.name] == [], point
        latest = resolve_resume("latest", ckdir.parent)
        assert latest.name == expected, point
        state, model = TINY["load"](latest)
        assert state.step == int(expected.split("-")[1])
        want, _, _, _ = TINY["tiny"](state.step)
        for (name, a), b in zip(
            model.state_dict().items(), want.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (point, name)


LOCK_HOLDER = r"""
import sys, time
from fastmid.train.runfolder import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("locked", flush=True, file=sys.stderr)
time.sleep(120)
"""


def test_second_run_on_a_locked_folder_is_refused_until_the_holder_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir)],
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    try:
        Lines(holder).wait_for("locked")
        with pytest.raises(RunLockedError) as info:
            acquire_run_lock(run_dir)
        message = str(info.value)
        assert isinstance(info.value, FastmidError) and "\n" not in message
        started = json.loads((run_dir / ".lock").read_text())["started"]
        assert f"(PID {holder.pid}, started {started})" in message
        assert str(run_dir) in message and "--output" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the OS released the dead holder's lock: no stale-lock cleanup needed
    with acquire_run_lock(run_dir) as lock:
        assert lock.held
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            acquire_run_lock(run_dir)  # one process, two runs: refused as well
    assert not lock.held
    acquire_run_lock(run_dir).release()


def test_lock_on_a_file_or_a_replaced_lock_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match="a file is in the way"):
        acquire_run_lock(tmp_path / "file")
    lock = acquire_run_lock(tmp_path / "run")
    lock.release()
    lock.release()  # idempotent
    (tmp_path / "run" / ".lock").unlink()  # e.g. an --overwrite that removed everything
    with acquire_run_lock(tmp_path / "run"):
        (tmp_path / "run" / "checkpoints" / "step-1").mkdir(parents=True)
        (tmp_path / "run" / "config.yaml").write_text("x")
        removed = clear_run_folder(tmp_path / "run")  # --overwrite keeps the held lock file
        assert sorted(p.name for p in removed) == ["checkpoints", "config.yaml"]
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
        with pytest.raises(RunLockedError):
            acquire_run_lock(tmp_path / "run")


# ---- a full disk ----------------------------------------------------------------------------


def _enospc_after(real, fail_on: str, partial_bytes: int = 100):
    """A writer that, for ``fail_on``, writes a few bytes and then fails as a full disk does."""

    def write(obj, path, *args):
        if Path(path).name == fail_on:
            Path(path).write_bytes(b"\0" * partial_bytes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args)

    return write


def _rust_enospc(real, fail_on: str):
    """What safetensors' Rust writer raises on a full disk: no errno, only text."""

    def write(obj, path, *args):
        if Path(path).name == fail_on:
            raise RuntimeError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(obj, path, *args)

    return write


@pytest.mark.parametrize(
    "writer,wrap,fail_on",
    [
        ("_save_safetensors", _enospc_after, "optimizer.safetensors"),
        ("_save_safetensors", _rust_enospc, "band.safetensors"),
        ("_save_json", _enospc_after, "trainer_state.json"),
    ],
)
def test_disk_full_during_a_save(tmp_path, monkeypatch, writer, wrap, fail_on):
    ckdir = tmp_path / "checkpoints"
    first = TINY["save"](ckdir, 1, width=32)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr(
        checkpoint_module, writer, wrap(getattr(checkpoint_module, writer), fail_on)
    )
    with pytest.raises(CheckpointError) as info:
        TINY["save"](ckdir, 2, width=32)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{ckdir}: disk full while writing the checkpoint step-2")
    # bytes needed: the band and AdamW's two moments, 32x32 + 3x32 float32 each, at least
    needed = re.search(r"needs about [^(]*\(([\d,]+) bytes\)", message)
    assert needed and int(needed.group(1).replace(",", "")) >= 3 * 4 * (32 * 32 + 3 * 32)
    assert "step-1 is intact" in message
    assert [p.name for p in ckdir.iterdir()] == ["step-1"]  # no partial folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert TINY["load"](resolve_resume("latest", tmp_path), width=32)[0].step == 1


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1.5 MiB tmpfs, where this test may mount one (root with CAP_SYS_ADMIN); else skipped."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_tmpfs(tiny_tmpfs):
    """One checkpoint (~0.8 MB: 256x256 weights and two AdamW moments) fits, the second does not."""
    ckdir = tiny_tmpfs / "checkpoints"
    first = TINY["save"](ckdir, 1, width=256)
    with pytest.raises(CheckpointError, match=r"disk full .* step-2 \(needs about .* free\)"):
        TINY["save"](ckdir, 2, width=256)
    assert list_checkpoints(ckdir) == [first]
    assert [p.name for p in ckdir.iterdir()] == ["step-1"]
    band = load_file(str(first / "band.safetensors"))
    want = TINY["tiny"](1, 256)[0]
    assert all(torch.equal(band[n], p.detach()) for n, p in want.named_parameters())
