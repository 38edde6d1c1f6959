"""The background checkpoint writer: what it writes is the state at submit time, hashed right."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pipeline.checkpoint.writer import BackgroundWriter
from pipeline.files import xxh3_128_file


class Scaler:
    """Stands for DeepSpeed's loss scaler: a plain object changed in place at later steps."""

    def __init__(self) -> None:
        self.scale = 1024.0


def test_files_hold_the_state_at_submit_time_and_their_hashes(tmp_path):
    writer = BackgroundWriter()
    weights = torch.arange(1_000_000, dtype=torch.float32)
    view = weights[10:20]  # a view: written as a compact copy, not the whole storage
    scaler = Scaler()
    state = {"w": weights, "view": view, "nested": [{"step": torch.tensor(3)}, (1, "a")], "scaler": scaler}
    try:
        for round_ in range(2):  # the second save reuses the staging buffers of the first
            root = tmp_path / f"save{round_}"
            root.mkdir()
            writer.begin(root)
            writer.submit(state, root / "a.pt")
            writer.submit({"only": weights[:5]}, root / "sub.pt")
            expected = weights.clone()
            weights.add_(1.0)  # the loop goes on training right away
            scaler.scale = 1.0
            records, error = writer.wait()
            assert error is None and set(records) == {"a.pt", "sub.pt"}
            for name, record in records.items():
                assert record.bytes == (root / name).stat().st_size
                assert record.digest == xxh3_128_file(root / name)
            loaded = torch.load(root / "a.pt", weights_only=False)
            assert torch.equal(loaded["w"], expected)
            assert torch.equal(loaded["view"], expected[10:20])
            assert loaded["view"].untyped_storage().nbytes() == 40
            assert loaded["nested"] == [{"step": torch.tensor(3)}, (1, "a")]
            assert loaded["scaler"].scale == 1024.0
            scaler.scale = 1024.0
        assert torch.serialization.get_crc32_options()  # switched off only while our writes ran
    finally:
        writer.close()


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs; needs root, as CI runs) to fill up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the injected ENOSPC fault test still runs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_reported_not_raised(full_disk):
    writer = BackgroundWriter()
    try:
        writer.begin(full_disk)
        writer.submit({"w": torch.ones(1_000_000)}, full_disk / "a.pt")  # 4 MB into 1 MiB
        records, error = writer.wait()
        assert records == {} and "0 MB free in" in str(error)  # a full disk, said in words
        assert writer.done()
        writer.begin(full_disk)  # the writer stays usable once space is back
        (full_disk / "a.pt").unlink()
        writer.submit({"w": torch.ones(1000)}, full_disk / "b.pt")
        records, error = writer.wait()
        assert error is None and records["b.pt"].digest == xxh3_128_file(full_disk / "b.pt")
    finally:
        writer.close()


def test_writes_start_once_everything_is_staged(tmp_path):
    writer = BackgroundWriter()
    try:
        writer.begin(tmp_path)
        writer.submit({"w": torch.ones(1000)}, tmp_path / "a.pt")
        writer.submit({"w": torch.zeros(1000)}, tmp_path / "b.pt")
        assert not writer.done() and list(tmp_path.iterdir()) == []  # staged, not competing with staging
        writer.start_writes()
        writer.wait_idle()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
        writer.begin(tmp_path / "sub")
        (tmp_path / "sub").mkdir()
        writer.submit({"w": torch.ones(10)}, tmp_path / "sub" / "c.pt")
        records, error = writer.wait()  # files nobody started are written by wait()
        assert error is None and set(records) == {"c.pt"}
    finally:
        writer.close()


def test_deferred_tensors_are_copied_in_the_background_and_hold_the_state_at_submit_time(tmp_path):
    writer = BackgroundWriter()
    weights = torch.arange(2_000_000, dtype=torch.float32)  # changed only by "the optimizer step"
    stats = torch.zeros(4)  # a buffer: changed by the next forward, before the step
    deferred = frozenset({weights.untyped_storage().data_ptr()})
    try:
        for round_ in range(2):
            root = tmp_path / f"save{round_}"
            root.mkdir()
            writer.begin(root)
            writer.submit({"w": weights, "w_view": weights[:3], "stats": stats}, root / "a.pt", deferred)
            saved_weights, saved_stats = weights.clone(), stats.clone()
            copies = writer._save.copies
            assert [src.data_ptr() for _, src in copies] == [weights.data_ptr(), weights.data_ptr()]
            stats.add_(1.0)  # the forward runs while the weights are still being copied
            writer.start_writes()
            writer.wait_staged()  # Engine.step waits here, then changes the weights
            weights.mul_(-1.0)
            records, error = writer.wait()
            assert error is None and records["a.pt"].digest == xxh3_128_file(root / "a.pt")
            loaded = torch.load(root / "a.pt", weights_only=True)
            assert torch.equal(loaded["w"], saved_weights) and torch.equal(loaded["stats"], saved_stats)
            assert torch.equal(loaded["w_view"], saved_weights[:3])
    finally:
        writer.close()


def test_done_and_wait_cover_the_deferred_copies(tmp_path):
    writer = BackgroundWriter()
    big = torch.ones(8_000_000)
    try:
        writer.begin(tmp_path)
        writer.submit({"w": big}, tmp_path / "a.pt", frozenset({big.untyped_storage().data_ptr()}))
        writer.start_writes()
        # copies still running (or writes queued after them) read as not done; wait() covers both
        records, error = writer.wait()
        assert error is None and set(records) == {"a.pt"}
        assert torch.equal(torch.load(tmp_path / "a.pt")["w"], big)
        assert writer.done()
    finally:
        writer.close()


def test_sealed_files_are_hashed_in_the_background_and_dropped_if_changed_after(tmp_path):
    writer = BackgroundWriter()
    (tmp_path / "sub").mkdir()
    latest, state = tmp_path / "latest", tmp_path / "sub" / "trainer_state.json"
    latest.write_text("state")
    state.write_text("{}")
    try:
        writer.begin(tmp_path)
        writer.submit({"w": torch.ones(10)}, tmp_path / "sub" / "w.pt")
        writer.seal([latest, state])
        assert not writer.done()
        writer.start_writes()
        writer._save.copied.result()  # written, then sealed
        state.write_text('{"step": 1}')  # changed after it was sealed: the commit must read it again
        records, error = writer.wait()
        assert error is None and set(records) == {"latest", "sub/w.pt"}
        assert records["latest"].digest == xxh3_128_file(latest) and records["latest"].bytes == 5
    finally:
        writer.close()
