"""The matcher's journal: records survive, torn tails are cut, damage elsewhere stops the start."""

from __future__ import annotations

import errno
import logging
import os
import random
from pathlib import Path

import pytest

from zmx import codec
from zmx.commands import CancelOrder, SubmitOrder
from zmx.engine import MatchingEngine
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce
from zmx.node import journal as journal_module
from zmx.node.journal import Journal, JournalError

SYM = "BTC-USDT"
SPEC = SymbolSpec(SYM, "0.01", "0.001")


def order(i: int) -> SubmitOrder:
    side = Side.BUY if i % 2 else Side.SELL
    price = 1000 - i % 7 if side is Side.BUY else 1010 + i % 5
    return SubmitOrder(f"o{i}", f"acct{i % 3}", SYM, side, OrderType.LIMIT, TimeInForce.GTC, price, 1 + i % 4)


def records(start: int, n: int) -> list[tuple[int, bytes]]:
    return [(1_000_000 + i, codec.encode(order(i))) for i in range(start, start + n)]


def commands(start: int, n: int) -> list[tuple[int, SubmitOrder]]:
    return [(1_000_000 + i, order(i)) for i in range(start, start + n)]


def record_offsets(n: int) -> list[int]:
    """Where each of the first ``n`` records of ``records(0, n)`` starts, and where the last ends."""
    sizes = [len(journal_module.encode_records(records(i, 1))) for i in range(n)]
    return [sum(sizes[:i]) for i in range(n + 1)]


def fresh(directory: Path, fsync: str = "batch") -> Journal:
    journal = Journal(directory, fsync=fsync)
    assert journal.recover() == (None, [])
    return journal


def crashed(directory: Path) -> None:
    """Make a journal closed here look as its process's crash would leave it: without the
    record of a clean stop."""
    (directory / journal_module.STOPPED).unlink()


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.log"))


def snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("snapshot-*.snap"))


def test_round_trip(tmp_path: Path) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 3))
        journal.sync()
        journal.append_batch(records(3, 2) + [(7, codec.encode(CancelOrder("o1", "acct1", SYM)))])
        journal.sync()
    with Journal(tmp_path) as journal:
        state, replay = journal.recover()
    assert state is None
    assert replay == commands(0, 5) + [(7, CancelOrder("o1", "acct1", SYM))]


def test_appending_after_recovery_continues_the_journal(tmp_path: Path) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 2)
        journal.append_batch(records(2, 2))
        journal.sync()
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 4)
        assert journal.since_snapshot == 4


@pytest.mark.parametrize("cut", [1, 5, 8, 12, 20])
def test_torn_tail_is_cut_off_and_reported(tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 5))
        journal.sync()
    crashed(tmp_path)
    segment = segments(tmp_path)[-1]
    size = segment.stat().st_size
    offsets = record_offsets(5)
    assert offsets[-1] == size
    record_size = offsets[5] - offsets[4]
    os.truncate(segment, size - cut)  # the last record loses its last `cut` bytes
    with caplog.at_level(logging.WARNING, logger="zmx.journal"), Journal(tmp_path) as journal:
        state, replay = journal.recover()
        assert replay == commands(0, 4)
        journal.append_batch(records(5, 1))  # and the journal goes on after the cut
        journal.sync()
    assert f"cut off a torn tail of {record_size - cut} byte(s)" in caplog.text
    assert segment.stat().st_size == offsets[4] + len(journal_module.encode_records(records(5, 1)))
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 4) + commands(5, 1)


def test_garbage_tail_is_cut_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 3))
        journal.sync()
    segment = segments(tmp_path)[-1]
    with open(segment, "ab") as f:
        f.write(random.Random(7).randbytes(300))  # a crash in a file system that leaves junk
        f.write(bytes(4096))  # or zeros
    with caplog.at_level(logging.WARNING, logger="zmx.journal"), Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 3)
    assert "cut off a torn tail of 300 byte(s)" in caplog.text  # the zeros after them are no damage
    assert segment.stat().st_size == record_offsets(3)[-1]


def crash_copy(journal: Journal, directory: Path) -> Path:
    """What the disk holds of ``journal``'s files if its process died now (synced, not closed)."""
    directory.mkdir()
    for path in journal.directory.iterdir():
        if path.name != "lock":
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


def crashed_segment(tmp_path: Path, n: int) -> Path:
    """The segment a process leaves that journaled ``n`` records, synced them and died."""
    with fresh(tmp_path / "j") as journal:
        journal.append_batch(records(0, n))
        journal.sync()
        crashed = crash_copy(journal, tmp_path / "crashed")
    return segments(crashed)[-1]


def test_the_segment_is_preallocated_and_trimmed_when_closed(tmp_path: Path) -> None:
    data = record_offsets(4)[-1]
    with fresh(tmp_path / "j") as journal:
        journal.append_batch(records(0, 4))
        journal.sync()
        segment = segments(journal.directory)[-1]
        assert segment.stat().st_size == data + journal_module.PREALLOCATE_BYTES
        journal.rotate()
        assert segment.stat().st_size == data, "a segment closed by rotate keeps its records only"
        journal.append_batch(records(4, 1))
        journal.sync()
    assert [p.stat().st_size for p in segments(tmp_path / "j")] == [data, record_offsets(5)[-1] - data]


def test_a_crash_leaves_zeros_after_the_records_and_the_journal_goes_on_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    segment = crashed_segment(tmp_path, 3)
    crashed = segment.parent
    assert segment.read_bytes()[record_offsets(3)[-1]:] == bytes(journal_module.PREALLOCATE_BYTES)
    with caplog.at_level(logging.WARNING, logger="zmx.journal"), Journal(crashed) as journal:
        assert journal.recover()[1] == commands(0, 3)
        journal.append_batch(records(3, 2))
        journal.sync()
    assert not caplog.text, "zeros after the records are no damage"
    assert segment.stat().st_size == record_offsets(5)[-1]
    with Journal(crashed) as journal:
        assert journal.recover()[1] == commands(0, 5)


def test_a_torn_record_before_the_preallocated_zeros_is_cut_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    segment = crashed_segment(tmp_path, 3)
    offsets = record_offsets(3)
    data = bytearray(segment.read_bytes())
    data[offsets[3] - 6:offsets[3]] = bytes(6)  # the last record's last page never reached the disk
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="zmx.journal"), Journal(segment.parent) as journal:
        assert journal.recover()[1] == commands(0, 2)
    assert f"cut off a torn tail of {offsets[3] - 6 - offsets[2]} byte(s) at offset {offsets[2]}" in caplog.text
    assert segment.stat().st_size == offsets[2]


def test_zeros_at_the_end_of_an_earlier_segment_are_damage(tmp_path: Path) -> None:
    """An earlier segment was cut to its records and synced before the next one was created:
    zeros there (a bad copy or restore of the directory) are not room, and nothing is dropped."""
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 5))
        journal.sync()
        journal.rotate()
        journal.append_batch(records(5, 2))
        journal.sync()
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    start = record_offsets(5)[2]
    data[start:] = bytes(len(data) - start)
    first.write_bytes(bytes(data))
    with Journal(tmp_path) as journal, pytest.raises(JournalError, match=f"damaged at offset {start}.*not the last"):
        journal.recover()


def test_a_preallocation_that_fails_half_way_leaves_no_zeros(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        os.ftruncate(fd, offset + length // 2)  # some of it was reserved before the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module.os, "posix_fallocate", full)
    with caplog.at_level(logging.INFO, logger="zmx.journal"), fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
        journal.append_batch(records(2, 1))
        journal.sync()
        journal.rotate()
        journal.append_batch(records(3, 1))
        journal.sync()
    assert caplog.text.count("cannot preallocate journal space") == 1
    sizes = [p.stat().st_size for p in segments(tmp_path)]
    assert sizes == [record_offsets(3)[-1], record_offsets(4)[-1] - record_offsets(3)[-1]]
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 4)


def test_a_file_system_without_preallocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(journal_module.os, "posix_fallocate", refuse)
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
        assert segments(tmp_path)[-1].stat().st_size == record_offsets(2)[-1]
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 2)


def test_no_preallocation_that_would_leave_the_disk_nearly_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The room ahead of the records must not take the space a snapshot needs: the journal
    appends instead, says so once, and preallocates again at a later segment if there is room."""
    real = os.fstatvfs
    free = {"bytes": journal_module.PREALLOCATE_BYTES + journal_module.PREALLOCATE_KEEP_FREE - 1}

    def statvfs(fd: int) -> os.statvfs_result:
        disk = real(fd)
        fields = list(disk)
        fields[4] = free["bytes"] // disk.f_frsize  # f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(journal_module.os, "fstatvfs", statvfs)
    with caplog.at_level(logging.INFO, logger="zmx.journal"), fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
        journal.append_batch(records(2, 1))
        journal.sync()
        assert segments(tmp_path)[-1].stat().st_size == record_offsets(3)[-1]
        free["bytes"] *= 2
        journal.rotate()
        journal.append_batch(records(3, 1))
        journal.sync()
        assert segments(tmp_path)[-1].stat().st_size > journal_module.PREALLOCATE_BYTES
    assert caplog.text.count("cannot preallocate journal space") == 1
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 4)


def test_corrupt_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 3))
        journal.sync()
    crashed(tmp_path)
    segment = segments(tmp_path)[-1]
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF
    segment.write_bytes(bytes(data))
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 2)


@pytest.mark.parametrize("flip", ["length", "crc", "payload"])
def test_corrupt_record_in_the_middle_is_refused(tmp_path: Path, flip: str) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 5))
        journal.sync()
    crashed(tmp_path)  # (after a clean stop, any damage is refused: below)
    segment = segments(tmp_path)[-1]
    data = bytearray(segment.read_bytes())
    start = record_offsets(5)[2]
    offset = start + {"length": 0, "crc": 5, "payload": 20}[flip]
    data[offset] ^= 0x40
    segment.write_bytes(bytes(data))
    with Journal(tmp_path) as journal, pytest.raises(JournalError) as error:
        journal.recover()
    message = str(error.value)
    assert f"is damaged at offset {start}" in message
    assert "an intact record follows" in message
    assert segment.stat().st_size == len(data), "nothing is cut off a journal that is refused"


@pytest.mark.parametrize("damage", ["zeros", "cut", "flip", "segment"])
def test_after_a_clean_stop_every_record_must_be_there(tmp_path: Path, damage: str) -> None:
    """A clean stop records where the journal ends (``stopped``). What a crash may leave at the
    end of the last segment (zeros, a torn record), or a newest segment gone, is then damage:
    refused, nothing changed, until that record is removed to accept the loss."""
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 3))
        journal.sync()
        journal.write_snapshot({SYM: engine.snapshot()})  # (its archive count: tests/test_usedids.py)
        journal.append_batch(records(3, 5))
        journal.sync()
    sizes = [len(journal_module.encode_records(records(i, 1))) for i in range(3, 8)]
    offsets = [sum(sizes[:i]) for i in range(6)]  # of the records in segment 2
    assert (tmp_path / journal_module.STOPPED).read_text() == f"2 {offsets[-1]}\n"
    segment = segments(tmp_path)[-1]
    data = segment.read_bytes()
    if damage == "zeros":  # the last two records zeroed, as a lost write-back would leave them
        segment.write_bytes(data[:offsets[3]] + bytes(len(data) - offsets[3]))
        wanted = f"is damaged at offset {offsets[3]}: a record length of 0 bytes"
    elif damage == "cut":  # cut on a record boundary: no torn record shows it
        segment.write_bytes(data[:offsets[4]])
        wanted = f"ends at offset {offsets[4]}, although the matcher stopped cleanly with {offsets[5]} bytes"
    elif damage == "flip":
        segment.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
        wanted = f"is damaged at offset {offsets[4]}: a record whose crc32 does not match"
    else:  # the newest segment deleted: segment 1 and the snapshot before 2 alone would look whole
        segment.unlink()
        wanted = "journal segment journal-0000000002.log is missing"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "lock"}
    with Journal(tmp_path) as journal, pytest.raises(JournalError, match=wanted) as error:
        journal.recover()
    assert f"remove {journal_module.STOPPED!r}" in str(error.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "lock"} == before
    crashed(tmp_path)  # the operator accepts the loss
    if damage == "segment":
        (tmp_path / segment.name).touch()
    with Journal(tmp_path) as journal:
        kept = journal.recover()[1]
    assert kept == {"zeros": commands(3, 3), "cut": commands(3, 4), "flip": commands(3, 4),
                    "segment": []}[damage]


def test_a_clean_stop_after_recovery_and_a_temporary_file_left_by_a_crash(tmp_path: Path) -> None:
    """The record of a clean stop is removed once a start recovered (the journal may grow or
    end in a crash from then on), and written again at the next clean stop. A temporary file
    that a crash left (a snapshot being written) goes at the next start, before the epoch."""
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
    stopped = tmp_path / journal_module.STOPPED
    assert stopped.exists()
    (tmp_path / "snapshot-0000000002.snap.tmp").write_bytes(b"half a snapshot")
    (tmp_path / "notes.tmp").mkdir()  # not one of ours: left alone
    journal = Journal(tmp_path)
    try:
        assert not (tmp_path / "snapshot-0000000002.snap.tmp").exists()
        assert journal.bump_epoch() == 1
        assert journal.recover()[1] == commands(0, 2)
        assert not stopped.exists()
        journal.append_batch(records(2, 1))
        journal.sync()
        assert not stopped.exists()
    finally:
        journal.close()
    assert stopped.read_text() == f"1 {record_offsets(3)[-1]}\n"
    assert (tmp_path / "notes.tmp").is_dir()


def test_a_snapshot_that_fails_to_write_leaves_no_temporary_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the half-written snapshot must not keep the space the journal needs."""
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 2))
        journal.sync()
        number = journal.rotate()

        def full(fd: int, data: bytes) -> int:
            os.write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(journal_module, "_write", full)
        with pytest.raises(OSError, match="No space left"):
            journal.store_snapshot(number, {SYM: MatchingEngine(SPEC).snapshot()}, 0)
        monkeypatch.undo()
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".tmp", ".snap")) == []
        journal.append_batch(records(2, 1))  # and the journal goes on
        journal.sync()
    with Journal(tmp_path) as journal:
        assert journal.recover() == (None, commands(0, 3))


def test_a_journal_whose_directory_was_removed_refuses_the_next_batch(tmp_path: Path) -> None:
    """Writes to a deleted file succeed, and a matcher would answer them: the batch is refused
    (the matcher then stops without answering it)."""
    directory = tmp_path / "m1"
    journal = fresh(directory)
    try:
        journal.append_batch(records(0, 2))
        journal.sync()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
        with pytest.raises(OSError, match="journal segment journal-0000000001.log was deleted while in use"):
            journal.append_batch(records(2, 1))
    finally:
        with pytest.raises(OSError):  # nowhere to record the stop
            journal.close()


def test_damage_in_an_earlier_segment_is_refused(tmp_path: Path) -> None:
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 3))
        journal.sync()
        journal.write_snapshot({SYM: engine.snapshot()})
        journal.append_batch(records(3, 3))
        journal.sync()
        journal.write_snapshot({SYM: engine.snapshot()})
    first_snapshot = snapshots(tmp_path)[-1]
    first_snapshot.write_bytes(b"ZMXS" + bytes(20))  # the newest snapshot is damaged: fall back ...
    middle = segments(tmp_path)[-2]
    os.truncate(middle, middle.stat().st_size - 2)  # ... and the segment it needs is damaged too
    with Journal(tmp_path) as journal, pytest.raises(JournalError, match="it is not the last segment"):
        journal.recover()


def test_snapshot_and_later_records(tmp_path: Path) -> None:
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        for ts, cmd in commands(0, 10):
            engine.handle(cmd, ts_ns=ts)
        journal.append_batch(records(0, 10))
        journal.sync()
        journal.write_snapshot({SYM: engine.snapshot()})
        assert journal.since_snapshot == 0
        journal.append_batch(records(10, 4))
        journal.sync()
    with Journal(tmp_path) as journal:
        state, replay = journal.recover()
    assert state is not None and state[SYM] == engine.snapshot()
    assert replay == commands(10, 4)
    restored = MatchingEngine.restore(state[SYM])
    for ts, cmd in replay:
        assert restored.handle(cmd, ts_ns=ts) == engine.handle(cmd, ts_ns=ts)
    assert restored.snapshot() == engine.snapshot()


def test_the_segment_after_a_snapshot_deleted_is_refused(tmp_path: Path) -> None:
    """rotate() creates the segment before the snapshot named after it is written: without that
    segment, whatever was answered since the snapshot is gone, and the start says so (it is not
    taken for an empty journal). An empty segment put there on purpose accepts the loss."""
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        for ts, cmd in commands(0, 3):
            engine.handle(cmd, ts_ns=ts)
        journal.append_batch(records(0, 3))
        journal.sync()
        journal.write_snapshot({SYM: engine.snapshot()})
        journal.append_batch(records(3, 2))  # answered after the snapshot
        journal.sync()
    crashed(tmp_path)  # (after a clean stop, the record of it shows the loss as well: below)
    lost = segments(tmp_path)[-1]
    assert lost.name == "journal-0000000002.log"
    lost.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with Journal(tmp_path) as journal, pytest.raises(
            JournalError, match=r"journal-0000000002.log is missing .* snapshot-0000000002.snap was written after"):
        journal.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused, nothing changed
    lost.touch()
    with Journal(tmp_path) as journal:
        state, replay = journal.recover()
        assert state == {SYM: engine.snapshot()} and replay == []
        journal.append_batch(records(5, 1))
        journal.sync()
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(5, 1)


def test_a_snapshot_written_elsewhere_that_never_arrives(tmp_path: Path) -> None:
    """rotate, then the process that should store the snapshot dies: the journal still holds
    everything, from the previous snapshot on."""
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        journal.write_snapshot({SYM: engine.snapshot()})
        journal.append_batch(records(0, 3))
        journal.sync()
        assert journal.rotate() == 3
        journal.append_batch(records(3, 2))
        journal.sync()
        number = journal.rotate()  # this one arrives
        for ts, cmd in commands(0, 5):
            engine.handle(cmd, ts_ns=ts)
        journal.store_snapshot(number, {SYM: engine.snapshot()})  # in another process, with:
        journal.remove_obsolete()
        journal.snapshot_stored(number)
        journal.append_batch(records(5, 1))
        journal.sync()
    with Journal(tmp_path) as journal:
        assert journal.recover() == ({SYM: engine.snapshot()}, commands(5, 1))
    (tmp_path / "snapshot-0000000004.snap").unlink()  # as if the one before segment 4 never arrived
    with Journal(tmp_path) as journal:
        state, replay = journal.recover()
    assert state == {SYM: MatchingEngine(SPEC).snapshot()} and replay == commands(0, 6)


def test_obsolete_files_are_removed_and_the_previous_snapshot_kept(tmp_path: Path) -> None:
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        for round_ in range(5):
            journal.append_batch(records(10 * round_, 10))
            journal.sync()
            for ts, cmd in commands(10 * round_, 10):
                engine.handle(cmd, ts_ns=ts)
            journal.write_snapshot({SYM: engine.snapshot()})
        journal.append_batch(records(50, 2))
        journal.sync()
    # segments 1..6 and snapshots before 2..6 were written: kept are the snapshots before
    # segments 5 and 6 and the segments from 5 on
    assert [p.name for p in snapshots(tmp_path)] == ["snapshot-0000000005.snap", "snapshot-0000000006.snap"]
    assert [p.name for p in segments(tmp_path)] == ["journal-0000000005.log", "journal-0000000006.log"]
    assert not list(tmp_path.glob("*.tmp"))
    with Journal(tmp_path) as journal:
        state, replay = journal.recover()
    assert state == {SYM: engine.snapshot()} and replay == commands(50, 2)


def test_a_damaged_newest_snapshot_falls_back_to_the_previous_one(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 5))
        journal.sync()
        for ts, cmd in commands(0, 5):
            engine.handle(cmd, ts_ns=ts)
        old_state = engine.snapshot()
        journal.write_snapshot({SYM: old_state})
        journal.append_batch(records(5, 5))
        journal.sync()
        for ts, cmd in commands(5, 5):
            engine.handle(cmd, ts_ns=ts)
        journal.write_snapshot({SYM: engine.snapshot()})
        journal.append_batch(records(10, 1))
        journal.sync()
    newest = snapshots(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="zmx.journal"), Journal(tmp_path) as journal:
        state, replay = journal.recover()
    assert state == {SYM: old_state}
    assert replay == commands(5, 6)
    assert "crc32 does not match" in caplog.text
    assert newest.with_name(newest.name + ".corrupt").exists()


def test_a_refused_recovery_names_the_unusable_snapshots_and_leaves_them_where_they_are(tmp_path: Path) -> None:
    """Both snapshots damaged: recovery would need the segments before them, long deleted. The
    refusal says why (a review saw only "journal-0000000001.log is missing", and both snapshots
    already renamed by the start that was refused)."""
    engine = MatchingEngine(SPEC)
    with fresh(tmp_path) as journal:
        for start in (0, 5, 10):
            journal.append_batch(records(start, 5))
            journal.sync()
            for ts, cmd in commands(start, 5):
                engine.handle(cmd, ts_ns=ts)
            journal.write_snapshot({SYM: engine.snapshot()})
    damaged = snapshots(tmp_path)
    assert len(damaged) == 2
    for path in damaged:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    with Journal(tmp_path) as journal, pytest.raises(JournalError) as refused:
        journal.recover()
    assert "journal-0000000001.log is missing" in str(refused.value)
    assert f"not usable, so not recovered from: {damaged[1].name}: " in str(refused.value)
    assert f"; {damaged[0].name}: " in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_missing_segment_is_refused(tmp_path: Path) -> None:
    with fresh(tmp_path) as journal:
        journal.append_batch(records(0, 1))
        journal.sync()
    segments(tmp_path)[0].rename(tmp_path / "journal-0000000002.log")
    with Journal(tmp_path) as journal, pytest.raises(JournalError, match="journal-0000000001.log is missing"):
        journal.recover()


@pytest.mark.parametrize(("mode", "writes", "syncs"), [("batch", 2, 2), ("always", 5, 5), ("never", 2, 0)])
def test_fsync_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, writes: int, syncs: int) -> None:
    calls = {"write": 0, "sync": 0}
    real_write, real_sync = journal_module._write, journal_module._datasync

    def write(fd: int, data: bytes) -> int:
        calls["write"] += 1
        return real_write(fd, data)

    def sync(fd: int) -> None:
        calls["sync"] += 1
        real_sync(fd)

    with fresh(tmp_path, mode) as journal:
        monkeypatch.setattr(journal_module, "_write", write)
        monkeypatch.setattr(journal_module, "_datasync", sync)
        journal.append_batch(records(0, 3))
        journal.sync()
        journal.append_batch(records(3, 2))
        journal.sync()
        journal.sync()  # nothing new: no second fdatasync
        assert calls == {"write": writes, "sync": syncs}
    with Journal(tmp_path) as journal:
        assert journal.recover()[1] == commands(0, 5)


def test_unknown_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync mode 'sometimes'"):
        Journal(tmp_path, fsync="sometimes")


def test_epoch_grows_by_one_at_each_start(tmp_path: Path) -> None:
    for expected in (1, 2, 3):
        with Journal(tmp_path) as journal:
            assert journal.bump_epoch() == expected
    assert (tmp_path / "epoch").read_text() == "3\n"
    (tmp_path / "epoch").write_text("garbage")
    with Journal(tmp_path) as journal, pytest.raises(JournalError, match="should hold a number"):
        journal.bump_epoch()


def test_a_data_dir_has_one_owner(tmp_path: Path) -> None:
    with Journal(tmp_path):
        with pytest.raises(JournalError, match="in use by another process"):
            Journal(tmp_path)
    Journal(tmp_path).close()  # free again once the owner closed it


def test_a_data_directory_that_cannot_be_used_says_which_file_and_why(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(JournalError, match=r"cannot use the data directory '.*afile': it is not a directory"):
        Journal(tmp_path / "afile")
    (tmp_path / "m1" / "lock").mkdir(parents=True)
    with pytest.raises(JournalError, match=r"cannot open '.*m1/lock' to lock the data directory: Is a directory"):
        Journal(tmp_path / "m1")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with Journal(tmp_path / "m2") as journal:
        monkeypatch.setattr(journal_module, "_write", full)
        with pytest.raises(JournalError, match=r"cannot write '.*m2/epoch': No space left on device"):
            journal.bump_epoch()
        monkeypatch.undo()
        assert not list((tmp_path / "m2").glob("*.tmp"))
