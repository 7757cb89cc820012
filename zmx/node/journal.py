"""Durability of one matcher: an append-only journal of commands, snapshots, an epoch.

Files in the matcher's ``data_dir`` (a relative path is resolved against the process's
working directory)::

    lock                       flock()ed while a process owns the directory
    epoch                      decimal text: how many times the matcher has started
    stopped                    "SEGMENT OFFSET": where a clean stop left the journal (removed
                               once a start has recovered)
    journal-0000000001.log     journal segments, numbered from 1
    snapshot-0000000003.snap   the engines' state before segment 3 (every record of
                               segments 1 and 2 is in it)

Journal records
---------------

A segment is a sequence of records, little-endian::

    u32 length | u32 crc32 | u64 ts_ns | command

``length`` counts the ``ts_ns`` and ``command`` bytes, ``crc32`` (``zlib.crc32``) covers the
same bytes, and ``command`` is the codec-encoded command exactly as it arrived
(``zmx.codec.decode`` reads it back). A record is only ever appended, never rewritten.

``append_batch`` writes a whole batch with one ``write`` call; ``sync`` makes it durable
according to the ``fsync`` mode of the topology:

- ``batch`` (default): one ``fdatasync`` per batch, before the batch is answered;
- ``always``: every record is written and synced on its own (one write + one fdatasync
  per record, so no answered command can be lost, even inside a batch);
- ``never``: no sync at all; the operating system writes the pages when it likes.

(``fdatasync`` persists the data and what reading it back needs, such as a grown file
size; where it does not exist, ``fsync``.)

Preallocation
-------------

The segment being written is grown ``PREALLOCATE_BYTES`` at a time (``posix_fallocate``),
ahead of the records: a write then neither grows the file nor allocates blocks, and its
``fdatasync`` has less metadata to commit. Measured on this machine's ext4: ``fdatasync``
after a 200-byte append 170-200 µs at p50 and 50-65 µs of CPU, after a write into
preallocated room 115-145 µs and 32-47 µs; the ack p99 of 2,000 orders/s through a router
and two matchers went from 9.2-10.5 ms to 6.1-7.6 ms (four rounds each, in turn, on a busy
day of the machine). The room past the last record reads as zeros; it is cut off when the
segment is closed (``rotate``, ``close``), so only a segment that was being written when its
process died ends in zeros. A file system that cannot preallocate gets plain appends, and so
does a disk that would have less than ``PREALLOCATE_KEEP_FREE`` (64 MiB) free after it (until
the next segment, when the journal tries again): room no record uses yet must not take the
space a snapshot needs.

Snapshots
---------

``write_snapshot`` stores every engine's ``snapshot()`` bytes, msgpack-packed with the number
of the segment that follows it and how many ids the archive of used order ids held for it
(``zmx.node.usedids``; absent in snapshots of an older zmx), as ``b"ZMXS" | u32 crc32 |
msgpack {version, segment, engines, archived}``: written to a temporary file (removed if the
write fails: a full disk must not keep it), fsynced, renamed over, the directory fsynced. Then
a new segment starts. The previous snapshot and the segments after it are kept (if the
newest snapshot is ever unreadable, recovery falls back to it and replays more, and moves the
unreadable one aside as ``*.corrupt`` once it has recovered; a recovery refused leaves every
file as it was and names the snapshots it could not use); anything
older is deleted.

Recovery
--------

``recover`` loads the newest valid snapshot and reads every record of the segments from
its segment on. Zeros after the last record of the last segment are the unused room of a
preallocated segment (no record starts with a zero length), not damage: the journal goes on
writing there (an earlier segment was cut to its records and synced before the next one was
created, so zeros at its end are damage). A torn tail of the **last** segment -- an
incomplete record, or a bad record with no valid record after it, which is what a crash in
the middle of a write leaves -- is cut off with a warning that says how many bytes (not
counting the zeros after them). Any other damage (a bad record followed by good ones, a bad
record in an earlier segment, a missing segment, the segment a snapshot is named after) raises
``JournalError``: replaying around it could silently lose commands that were answered. (The
segment a snapshot is named after always exists: ``rotate`` creates it, and syncs the
directory, before that snapshot is written.)

Only the last segment can have a torn tail: a segment is fsynced before the next one is
started, whatever the mode. After a clean stop there is none: ``close`` writes ``stopped``
with where the records end, and ``recover`` then refuses (``JournalError``, nothing changed)
a last segment that is missing, or whose records are damaged, zeroed or cut before that
offset -- damage that would otherwise look like the end of a journal; removing ``stopped``
accepts the loss. ``recover`` also clears what a crash may leave behind: snapshots and
segments that a newer snapshot made obsolete (and the constructor, before anything is
written, the temporary files of ``_write_atomically``). A data directory has one owner at a
time (``flock`` on ``lock``); a second process is refused.

``append_batch`` refuses a batch (``OSError``) once the segment's file was deleted (its
directory removed while the matcher runs): writes to it would succeed and be lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from zmx.codec import MAX_MESSAGE_BYTES, decode
from zmx.commands import COMMAND_TYPES, Command
from zmx.exceptions import DecodeError, ZmxError

if TYPE_CHECKING:
    from zmx.node.runtime import StartProgress

__all__ = ["FSYNC_MODES", "Journal", "JournalError", "SNAPSHOT_VERSION", "STOPPED"]

log = logging.getLogger("zmx.journal")

FSYNC_MODES = ("batch", "always", "never")
SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"ZMXS"

_RECORD_HEAD = struct.Struct("<II")  # length, crc32
_TS = struct.Struct("<Q")
_SNAP_HEAD = struct.Struct("<4sI")  # magic, crc32
_MIN_RECORD = _TS.size + 1  # a timestamp and at least one byte of command
_MAX_RECORD = _TS.size + MAX_MESSAGE_BYTES
PREALLOCATE_BYTES = 16 << 20  # the segment being written grows this much at a time (see "Preallocation")
PREALLOCATE_KEEP_FREE = 4 * PREALLOCATE_BYTES  # no preallocation that would leave less free on the disk
_SEGMENT = re.compile(r"journal-(\d{10})\.log")
_SNAPSHOT = re.compile(r"snapshot-(\d{10})\.snap")
STOPPED = "stopped"  # where the journal ended at a clean stop: "SEGMENT OFFSET" (see "Recovery")
_TEMPORARY = re.compile(r"(epoch|stopped|snapshot-\d{10}\.snap)\.tmp")  # _write_atomically's

# Looked up at call time, so a test can count them.
_write = os.write
_datasync = getattr(os, "fdatasync", os.fsync)


class JournalError(ZmxError):
    """The data directory cannot be used: in use, damaged, or unwritable. The message says
    which file and what to do."""


def _segment_name(number: int) -> str:
    return f"journal-{number:010d}.log"


def _snapshot_name(number: int) -> str:
    return f"snapshot-{number:010d}.snap"


def _write_all(fd: int, data: bytes) -> None:
    """One write call (a regular file takes it whole); loop only if the OS writes less."""
    written = _write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += _write(fd, view[written:])


def encode_records(records: Sequence[tuple[int, bytes]]) -> bytes:
    """``[(ts_ns, command_bytes), ...]`` -> the bytes of those journal records."""
    parts = []
    append = parts.append
    head, ts_pack, crc32 = _RECORD_HEAD.pack, _TS.pack, zlib.crc32
    for ts_ns, command in records:
        ts = ts_pack(ts_ns)
        append(head(len(command) + 8, crc32(command, crc32(ts))))
        append(ts)
        append(command)
    return b"".join(parts)


class _BadRecord(Exception):
    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(problem)
        self.offset = offset
        self.problem = problem


def _record_at(data: bytes, offset: int) -> tuple[int, bytes, int] | str:
    """``(ts_ns, command, next_offset)`` of the record at ``offset``, or what is wrong with it."""
    end = len(data)
    if end - offset < _RECORD_HEAD.size:
        return f"{end - offset} byte(s) where a record header (8 bytes) should be"
    length, crc = _RECORD_HEAD.unpack_from(data, offset)
    if not _MIN_RECORD <= length <= _MAX_RECORD:
        return f"a record length of {length} bytes (valid: {_MIN_RECORD} to {_MAX_RECORD})"
    start = offset + _RECORD_HEAD.size
    if start + length > end:
        return f"a {length}-byte record with only {end - start} byte(s) left in the file"
    if zlib.crc32(data[start:start + length]) != crc:
        return "a record whose crc32 does not match its bytes"
    (ts_ns,) = _TS.unpack_from(data, start)
    return ts_ns, data[start + _TS.size:start + length], start + length


def _valid_record_after(data: bytes, offset: int, used: int) -> int | None:
    """The offset of the first intact record that starts after ``offset``, if any; ``used``:
    where the zeros at the end of ``data`` start (a record's length is never zero, so none
    starts among them).

    A crash leaves nothing valid after a torn write; something valid there means the damage
    is in the middle of the journal. Tried first where the damaged record says it ends,
    then at every byte.
    """
    if len(data) - offset >= _RECORD_HEAD.size:
        length = _RECORD_HEAD.unpack_from(data, offset)[0]
        candidate = offset + _RECORD_HEAD.size + length
        if _MIN_RECORD <= length <= _MAX_RECORD and not isinstance(_record_at(data, candidate), str):
            return candidate
    unpack_from, head = _RECORD_HEAD.unpack_from, _RECORD_HEAD.size
    end = len(data)
    for candidate in range(offset + 1, min(end - head - _MIN_RECORD + 1, used)):
        length = unpack_from(data, candidate)[0]
        if _MIN_RECORD <= length <= _MAX_RECORD and candidate + head + length <= end:
            if not isinstance(_record_at(data, candidate), str):
                return candidate
    return None


def _lost_after_clean_stop(problem: str, accept: str) -> JournalError:
    """The refusal of a start whose journal lost records that a clean stop left (``STOPPED``):
    ``problem`` says what is wrong, ``accept`` what removing that file lets a start do."""
    return JournalError(
        f"{problem} (the file {STOPPED!r} says so), and the commands lost were answered, so the matcher does not "
        f"start. Restore the data directory from a backup; to {accept} and accept losing them, remove {STOPPED!r}")


def _disk_space(fd: int) -> tuple[int, int]:
    """``(free, size)`` in bytes of the file system ``fd`` is on (free: what this process may
    still use)."""
    disk = os.fstatvfs(fd)
    return disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize


def _preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve ``length`` bytes of the file from ``offset`` on (they read as zeros); False where
    it cannot be done (the file system does not support it, or is too full to reserve that
    much: the records themselves may still fit), or where it would leave less than
    ``PREALLOCATE_KEEP_FREE`` free: room that no record uses yet must not take the space a
    snapshot (written by a child process) or the archive of used order ids needs."""
    try:
        if _disk_space(fd)[0] < length + PREALLOCATE_KEEP_FREE:
            return False
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSPC, errno.EFBIG, errno.ENOSYS):
            return False
        raise
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or ``data``, whatever happens."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # a write that failed (a full disk) must not keep the space it took: the journal needs it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Journal:
    """The journal, snapshots and epoch of one matcher in ``directory``.

    Use: ``Journal(dir, fsync=...)`` (takes the directory's lock), ``bump_epoch()``,
    ``recover()`` (required before appending), then ``append_batch`` + ``sync`` per batch and
    ``write_snapshot`` now and then; ``close()`` at the end.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: str = "batch") -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync mode {fsync!r} is not one of: {', '.join(FSYNC_MODES)}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment = 0  # the segment appended to; 0 until recover()
        self.since_snapshot = 0  # records after the newest snapshot (replayed ones included)
        self.snapshot_segment: int | None = None  # the segment that follows the snapshot recovered from
        self.snapshot_archived: int | None = None  # the ids that snapshot says the archive of used ids held
        self._fd = -1
        self._end = 0  # where the next record goes in the current segment
        self._room = 0  # the current segment's size: past _end, preallocated zeros
        self._preallocate = True  # False once the file system refused, until the next segment
        self._told = False  # that it cannot preallocate (logged once)
        self._dirty = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = "it is not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
            raise JournalError(f"cannot use the data directory {str(self.directory)!r}: {problem}") from None
        try:
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JournalError(f"cannot open {str(self.directory / 'lock')!r} to lock the data directory: "
                               f"{e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalError(f"the data directory {str(self.directory)!r} is in use by another process "
                                   "(is this matcher already running?)") from None
            raise JournalError(f"cannot lock the data directory {str(self.directory)!r}: {e.strerror or e}") from None
        # What a snapshot or epoch write cut short by a crash left: before anything is written
        # here (the epoch first), since on a full disk that space is what the writes need.
        for stale in self.directory.iterdir():
            if _TEMPORARY.fullmatch(stale.name) and stale.is_file():
                stale.unlink()

    # -- epoch ----------------------------------------------------------------------------

    def bump_epoch(self) -> int:
        """Read the epoch, add one, write it back atomically; the new epoch."""
        path = self.directory / "epoch"
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = "0"
        except (OSError, UnicodeDecodeError) as e:
            raise JournalError(f"cannot read {str(path)!r}: {e}") from None
        if not text.isdigit():
            raise JournalError(f"{str(path)!r} should hold a number, not {text[:40]!r}; "
                               "fix or remove it (a removed epoch starts again at 1)")
        epoch = int(text) + 1
        try:
            _write_atomically(path, f"{epoch}\n".encode("ascii"))
        except OSError as e:
            raise JournalError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        return epoch

    # -- recovery -------------------------------------------------------------------------

    def _numbered(self, pattern: re.Pattern[str]) -> dict[int, Path]:
        found = {}
        for path in self.directory.iterdir():
            m = pattern.fullmatch(path.name)
            if m is not None:
                found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def _read_snapshot(self, number: int, path: Path) -> tuple[dict[str, bytes], int | None] | str:
        """The engines of a snapshot file and how many archived order ids it relies on (``None``:
        it does not say), or what is wrong with it."""
        try:
            data = path.read_bytes()
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
        if len(data) < _SNAP_HEAD.size:
            return f"only {len(data)} bytes long"
        magic, crc = _SNAP_HEAD.unpack_from(data)
        body = data[_SNAP_HEAD.size:]
        if magic != SNAPSHOT_MAGIC:
            return f"does not start with {SNAPSHOT_MAGIC!r}"
        if zlib.crc32(body) != crc:
            return "its crc32 does not match its content"
        try:
            state = msgpack.unpackb(body, raw=False)
            version, segment, engines = state["version"], state["segment"], state["engines"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            return f"not a snapshot ({e})"
        if version != SNAPSHOT_VERSION:
            return f"snapshot format version {version!r}, this zmx reads version {SNAPSHOT_VERSION}"
        if segment != number or not isinstance(engines, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in engines.items()):
            return "its content does not match its name"
        archived = state.get("archived")  # absent in the snapshots of an older zmx
        if archived is not None and (type(archived) is not int or archived < 0):
            return f"its count of archived order ids is {archived!r}"
        return engines, archived

    def _read_segment(self, path: Path, last: bool, clean_end: int | None = None,
                      progress: StartProgress | None = None) -> tuple[list[tuple[int, Command]], int]:
        """The segment's records and where the last one ends. ``clean_end``: where a clean
        stop left its records (``STOPPED``); none of them may be missing, torn or zeros."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise JournalError(f"cannot read journal segment {str(path)!r}: {e.strerror or e}") from None
        records: list[tuple[int, Command]] = []
        offset = 0
        end = len(data)
        while offset < end:
            found = _record_at(data, offset)
            if isinstance(found, str) and clean_end is not None and offset < clean_end:
                raise _lost_after_clean_stop(
                    f"journal segment {str(path)!r} is damaged at offset {offset}: {found}, although the matcher "
                    f"stopped cleanly with {clean_end} bytes of records in it", "cut the segment there")
            if isinstance(found, str):
                used = len(data.rstrip(b"\0"))
                if used <= offset and last:  # an earlier segment that ends in zeros is damaged (see Recovery)
                    break  # only zeros from here on: the preallocated room
                later = _valid_record_after(data, offset, used)
                if last and later is None:
                    self._truncate(path, offset, used - offset, found)
                    break
                where = (f"an intact record follows at offset {later}" if later is not None
                         else "it is not the last segment")
                raise JournalError(
                    f"journal segment {str(path)!r} is damaged at offset {offset}: {found}, and {where}; "
                    "replaying past it could lose answered commands, so the matcher does not start. "
                    "Restore the data directory from a backup, or move the damaged segment and the "
                    "later ones aside to accept losing the commands they hold")
            ts_ns, command, next_offset = found
            try:
                cmd = decode(command)
            except DecodeError as e:
                raise JournalError(f"journal segment {str(path)!r}: the record at offset {offset} "
                                   f"is intact but not a command: {e}") from None
            if type(cmd) not in COMMAND_TYPES:
                raise JournalError(f"journal segment {str(path)!r}: the record at offset {offset} "
                                   f"holds a {type(cmd).__name__}, not a command")
            records.append((ts_ns, cmd))  # type: ignore[arg-type]
            offset = next_offset
            if progress is not None and len(records) & 0x3FFF == 0 and progress.due():
                progress.say(f"reading journal segment {path.name}: {offset / 1e6:,.0f} of {end / 1e6:,.0f} MB")
        if clean_end is not None and offset < clean_end:
            raise _lost_after_clean_stop(
                f"journal segment {str(path)!r} was cut short: it ends at offset {offset}, although the matcher "
                f"stopped cleanly with {clean_end} bytes of records in it", "start from what is there")
        return records, offset

    @staticmethod
    def _truncate(path: Path, offset: int, size: int, problem: str) -> None:
        """Cut ``path`` at ``offset``: ``size`` bytes there and after are not zeros."""
        log.warning("%s: cut off a torn tail of %d byte(s) at offset %d (%s); that write was interrupted (a crash, "
                    "a full disk)", path.name, size, offset, problem)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self, progress: StartProgress | None = None
                ) -> tuple[dict[str, bytes] | None, list[tuple[int, Command]]]:
        """``(engines, replay)``: the newest valid snapshot's engine states (symbol ->
        ``MatchingEngine.snapshot()`` bytes; ``None`` without a snapshot) and every
        ``(ts_ns, command)`` journaled after it, in order. Opens the journal for appending;
        says how a long read goes on through ``progress``."""
        if self._fd >= 0:
            raise RuntimeError("recover() was already called")
        stopped = self._read_stopped()
        snapshots = self._numbered(_SNAPSHOT)
        segments = self._numbered(_SEGMENT)
        if stopped is not None and (not segments or stopped[0] > max(segments)):
            raise _lost_after_clean_stop(
                f"journal segment {_segment_name(stopped[0])} is missing from {str(self.directory)!r}: the matcher "
                "stopped cleanly with it as its newest segment", "start from what is there")
        engines: dict[str, bytes] | None = None
        base = 1
        unusable: list[tuple[Path, str]] = []  # moved aside only once the recovery succeeds
        for number in reversed(snapshots):
            found = self._read_snapshot(number, snapshots[number])
            if isinstance(found, str):
                unusable.append((snapshots[number], found))
                continue
            (engines, self.snapshot_archived), base = found, number
            break
        try:
            replay, end = self._replay(stopped, segments, engines, base, progress)
        except JournalError as e:
            if unusable:  # the cause: say so (the files are left as they were)
                said = "; ".join(f"{path.name}: {problem}" for path, problem in unusable)
                raise JournalError(f"{e} (not usable, so not recovered from: {said})") from None
            raise
        for path, problem in unusable:
            bad = path.with_name(path.name + ".corrupt")
            log.error("%s is not usable (%s); moved to %s, recovered from an older state", path.name, problem,
                      bad.name)
            os.replace(path, bad)
        self.snapshot_segment = base if engines is not None else None
        self.since_snapshot = len(replay)
        if stopped is not None:  # from now on the journal may grow, or end in a crash
            os.unlink(self.directory / STOPPED)
            _fsync_dir(self.directory)
        self._open_segment(self.segment, end)
        self.remove_obsolete()  # a crash may have come between a snapshot and its clean-up
        return engines, replay

    def _replay(self, stopped: tuple[int, int] | None, segments: dict[int, Path], engines: dict[str, bytes] | None,
                base: int, progress: StartProgress | None) -> tuple[list[tuple[int, Command]], int]:
        """The commands after snapshot ``base`` (``engines``; None: no snapshot) and where the
        last segment's records end; sets ``segment``. ``JournalError`` if they cannot all be read."""
        needed = [n for n in segments if n >= base]
        if engines is not None and base not in segments:
            # rotate() creates the segment before the snapshot named after it is written, so
            # this segment existed: it was deleted, and the commands it held with it
            raise JournalError(
                f"journal segment {_segment_name(base)} is missing from {str(self.directory)!r}, although "
                f"{_snapshot_name(base)} was written after it was started: any command answered since that "
                "snapshot is gone, so the matcher does not start. Restore the data directory from a backup, "
                f"or create an empty {_segment_name(base)} there to start from the snapshot and accept "
                "losing them")
        if needed != list(range(base, base + len(needed))):
            missing = next(n for n in range(base, needed[-1] + 1) if n not in segments)
            after = f" after snapshot {_snapshot_name(base)}" if engines is not None else " (no usable snapshot)"
            raise JournalError(
                f"journal segment {_segment_name(missing)} is missing from {str(self.directory)!r}: recovery "
                f"starts at segment {base}{after} and needs every segment from there on")
        replay: list[tuple[int, Command]] = []
        end = 0
        for number in needed:
            last = number == needed[-1]
            clean_end = stopped[1] if stopped is not None and last and stopped[0] == number else None
            records, end = self._read_segment(segments[number], last, clean_end, progress)
            replay.extend(records)
        self.segment = needed[-1] if needed else base
        return replay, end

    def _read_stopped(self) -> tuple[int, int] | None:
        """``(segment, offset)`` of ``STOPPED``, where the last clean stop left the journal;
        ``None`` after a crash (or before this zmx wrote the file)."""
        path = self.directory / STOPPED
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise JournalError(f"cannot read {str(path)!r}: {e}") from None
        fields = text.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise JournalError(f"{str(path)!r} should hold a segment number and an offset, not {text[:40]!r}; "
                               "remove it if the matcher's last stop was not clean")
        return int(fields[0]), int(fields[1])

    def _open_segment(self, number: int, end: int = 0) -> None:
        """Write segment ``number`` from ``end`` on (its last record's end; zeros may follow)."""
        path = self.directory / _segment_name(number)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            self._room = os.fstat(fd).st_size
            os.lseek(fd, end, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._end = end
        self._preallocate = True
        if not existed:
            _fsync_dir(self.directory)

    def _reserve(self, size: int) -> None:
        """Room for ``size`` more bytes in the segment, preallocated if it was not already."""
        end = self._end + size
        if end > self._room and self._preallocate:
            if _preallocate(self._fd, self._room, end + PREALLOCATE_BYTES - self._room):
                self._room = end + PREALLOCATE_BYTES
            else:
                self._preallocate = False  # appends until the next segment
                if not self._told:
                    self._told = True
                    log.info("%s: cannot preallocate journal space (not supported, or the disk is nearly "
                             "full); appending without", self.directory)

    def _trim(self) -> None:
        """Cut the segment to its records before it is closed: the preallocated room, and
        whatever a preallocation that failed half-way may have added."""
        os.ftruncate(self._fd, self._end)
        self._room = self._end

    # -- appending ------------------------------------------------------------------------

    def append_batch(self, records: Sequence[tuple[int, bytes]]) -> None:
        """Append ``[(ts_ns, command_bytes), ...]``: one write (``always``: one write and one
        fdatasync per record). ``OSError`` means the batch may not be durable: do not answer it."""
        if not records:
            return
        fd = self._fd
        if not os.fstat(fd).st_nlink:  # about 1 us, against 100-700 us for the batch's fdatasync here
            raise OSError(errno.ENOENT, f"journal segment {_segment_name(self.segment)} was deleted while in use "
                                        "(the data directory removed?)")
        if self.fsync == "always":
            encoded = [encode_records((record,)) for record in records]
            self._reserve(sum(map(len, encoded)))
            for data in encoded:
                _write_all(fd, data)
                self._end += len(data)
                _datasync(fd)
        else:
            data = encode_records(records)
            self._reserve(len(data))
            _write_all(fd, data)
            self._end += len(data)
            self._dirty = True
        self.since_snapshot += len(records)

    def sync(self) -> None:
        """Make what was appended durable, as the mode says (``batch``: one fdatasync)."""
        if self._dirty:
            if self.fsync == "batch":
                _datasync(self._fd)
            self._dirty = False

    def disk_space(self) -> tuple[int, int]:
        """``(free, size)`` in bytes of the file system the journal is written to."""
        return _disk_space(self._fd)

    # -- snapshots ------------------------------------------------------------------------

    def write_snapshot(self, engines: Mapping[str, bytes], archived: int | None = None) -> None:
        """Store the state of every engine (symbol -> ``MatchingEngine.snapshot()``), which
        must hold every record appended so far; start a new segment; delete what is obsolete.

        The same in steps, for a snapshot written by another process (the matcher forks one,
        so the engines' state is frozen while it keeps serving): ``rotate`` at the moment of
        the state, ``store_snapshot`` and then ``remove_obsolete`` in the other process,
        ``snapshot_stored`` once it succeeded."""
        number = self.rotate()
        self.store_snapshot(number, engines, archived)
        self.remove_obsolete()
        self.snapshot_stored(number)

    def rotate(self) -> int:
        """Close the current segment (fsynced, whatever the mode: only the last segment may
        have a torn tail) and start the next; its number, which is the name of the snapshot
        of the state as of now."""
        new = self.segment + 1
        self._trim()
        os.fsync(self._fd)
        self._dirty = False
        os.close(self._fd)
        self._fd = -1
        self._open_segment(new)
        self.segment = new
        self.since_snapshot = 0
        return new

    def store_snapshot(self, number: int, engines: Mapping[str, bytes], archived: int | None = None) -> None:
        """Write snapshot ``number`` atomically and durably, with ``archived``: how many ids the
        archive of used order ids holds for it (``zmx.node.usedids``). Touches no state of
        this object (safe in a forked child process)."""
        state: dict[str, Any] = {"version": SNAPSHOT_VERSION, "segment": number, "engines": dict(engines)}
        if archived is not None:
            state["archived"] = archived
        body = msgpack.packb(state, use_bin_type=True)
        _write_atomically(self.directory / _snapshot_name(number),
                          _SNAP_HEAD.pack(SNAPSHOT_MAGIC, zlib.crc32(body)) + body)

    def snapshot_stored(self, number: int) -> None:
        """Snapshot ``number`` is on disk (and ``remove_obsolete`` ran after it)."""
        self.snapshot_segment = number

    def remove_obsolete(self) -> None:
        """Keep the newest snapshot, the one before it and the segments from that one on.
        Touches no state of this object (safe in a forked child process, which is where the
        matcher runs it: unlinking a segment of ~10 MB took 17 ms on this disk, a stall of
        the loop that the child does not mind)."""
        snapshots = list(self._numbered(_SNAPSHOT))
        if len(snapshots) < 2:
            return
        keep_from = snapshots[-2]
        for number, path in self._numbered(_SNAPSHOT).items():
            if number < keep_from:
                path.unlink()
        for number, path in self._numbered(_SEGMENT).items():
            if number < keep_from:
                path.unlink()
        for path in self.directory.glob("*.corrupt"):
            m = _SNAPSHOT.fullmatch(path.name[:-len(".corrupt")])
            if m is not None and int(m.group(1)) < keep_from:
                path.unlink()

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Sync (whatever the mode: a clean stop loses nothing), say where the journal ends
        (``STOPPED``), release the directory."""
        if self._fd >= 0:
            try:
                self._trim()
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
            _write_atomically(self.directory / STOPPED, f"{self.segment} {self._end}\n".encode("ascii"))
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
