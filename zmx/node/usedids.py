"""Order ids that were used long ago, on disk: the matcher's memory stays bounded.

DESIGN.md: an ``order_id`` is never reused, not even after its order ended. An engine keeps
the ``account\\x00order_id`` key of every order it accepted (``MatchingEngine``); kept in a
Python set that is about 110 bytes an id, and a matcher that takes 20,000 orders a second
would need 32 GB after five days. So a matcher moves them here:

- each snapshot's child process (``Matcher.fork_snapshot``) writes the ids of the engines'
  current generation into an SQLite table in the data directory and commits (``synchronous
  = FULL``) *before* it writes the snapshot, which then holds none of them: the snapshot, the
  journal after it and this table together hold every id (the parent closes its connection
  for the fork: see ``UsedIds.release``), and moves them from the write-ahead log into the
  database file, so that the serving process never does;
- the parent keeps checking that generation in memory (the engine's ``handed`` set) until
  the child has finished, then adds it to the filters below, a slice per loop turn
  (``SymbolIds.absorb``), and forgets the strings.

The table and the snapshots depend on each other, so each snapshot records how many ids the
table held when it was written (``store`` returns it: a second table, ``generations``, counts
the rows each generation added). A matcher refuses to start when the table holds fewer ids
than its snapshot says (the file was lost, emptied or replaced: old order ids would be
accepted again), and when the table holds ids of a generation later than the newest journal
segment (a snapshot's child stores generation N only after segment N was started, so that
segment existed and was lost). Only the first start of a data directory creates the file.

A lookup (``key in ids``) asks a Bloom filter first: in memory, 16 bits an id (2 bytes
instead of 110), no false "absent", about 1 false "present" in 400. Only a "present" goes to
the table, so a new id (nearly every lookup) never touches the disk and the answer is
exact. The filters grow in tiers, each four times the last, so none is ever rebuilt. At
start they are filled from the table while the matcher serves (``UsedIds.load``, 2 ms a
loop turn: 12 million ids took 35 s beside a stream of orders here; a matcher that scanned
them first was not ready for 24 s, and its supervisor, which waits 20 s, killed it); until a
symbol's filters are whole, each of its lookups asks the table (exact, a few microseconds).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ArchiveMismatch", "FILE_NAME", "UsedIds", "SymbolIds", "store"]

FILE_NAME = "used-ids.sqlite3"
FIRST_TIER = 1 << 16  # ids the first filter of a symbol holds; each next one holds 4x more
BITS_PER_ID = 16
PROBES = 4  # bits set per id: with 16 bits an id, about 0.25% false "present" (unrolled in __contains__)
_MASK32 = (1 << 32) - 1

# gen: the snapshot whose child stored the row (its journal segment number)
_SCHEMA = "CREATE TABLE IF NOT EXISTS used_ids (symbol TEXT NOT NULL, key TEXT NOT NULL, gen INTEGER NOT NULL, " \
          "PRIMARY KEY (symbol, key)) WITHOUT ROWID"
# how many rows of used_ids each generation added (their sum is the table's size, without a scan)
_GENERATIONS = "CREATE TABLE IF NOT EXISTS generations (gen INTEGER PRIMARY KEY, ids INTEGER NOT NULL)"


class ArchiveMismatch(Exception):
    """The archive does not hold what the journal's snapshots say it does (the message says
    what, and what to do)."""


def _connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection that writes (a snapshot's child, and the start of a matcher). Only
    ``create`` makes a missing file: a child must not store into a new, empty archive when
    the matcher's was removed under it."""
    mode = "rwc" if create else "rw"
    db = sqlite3.connect(path.resolve().as_uri() + f"?mode={mode}", uri=True, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(_SCHEMA)
        db.execute(_GENERATIONS)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _total(db: sqlite3.Connection) -> int:
    return db.execute("SELECT coalesce(sum(ids), 0) FROM generations").fetchone()[0]


def _connect_reader(path: Path) -> sqlite3.Connection:
    """The serving matcher's connection: it only looks ids up. Read-only, so that closing it
    before each fork costs nothing: the last connection that can write checkpoints the WAL
    into the database file when it closes, which took 14-17 ms after a generation of 100,000
    ids (0.02 ms for a reader), and the matcher's loop would wait for it."""
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)


def store(directory: str | Path, gen: int, generations: Iterable[tuple[str, Iterable[str]]]) -> int:
    """Write ``(symbol, keys)`` into the directory's table as snapshot ``gen``'s and commit
    durably; how many ids the table holds now (snapshot ``gen`` records it). Opens its own
    connection: a snapshot's child calls this, and an SQLite connection must not cross a
    fork. The file must exist (``UsedIds`` made it): ``sqlite3.OperationalError`` if not.

    A reader of its own holds the write-ahead log's files open around the writer, which then
    does not close last and does not delete them (a reader's close never does). Deleted, they
    must be made again (32 KiB or more): on a nearly full disk a review saw the next start fail
    ("disk I/O error") and a matcher in cancels-only mode stop. (The serving process's reader,
    opened again after the fork, may not have read yet when this ends.)"""
    path = Path(directory) / FILE_NAME
    keeper = _connect_reader(path)
    try:
        keeper.execute("SELECT 1 FROM used_ids LIMIT 1").fetchall()  # read to the end: no read left open
        return _store(_connect(path), gen, generations)
    finally:
        keeper.close()


def _store(db: sqlite3.Connection, gen: int, generations: Iterable[tuple[str, Iterable[str]]]) -> int:
    try:
        added = 0
        db.execute("BEGIN")
        for symbol, keys in generations:
            cursor = db.executemany("INSERT OR IGNORE INTO used_ids VALUES (?, ?, ?)",
                                    [(symbol, key, gen) for key in keys])
            added += cursor.rowcount  # a key stored already (by a snapshot that failed) is not added again
        db.execute("INSERT INTO generations VALUES (?, ?) ON CONFLICT (gen) DO UPDATE SET ids = ids + excluded.ids",
                   (gen, added))
        total = _total(db)
        db.execute("COMMIT")
        # Here, in the snapshot's child, rather than in a later close of the serving process.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return total
    finally:
        db.close()


class _Tier:
    __slots__ = ("bits", "capacity", "count", "size")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.size = capacity * BITS_PER_ID
        self.bits = bytearray(self.size // 8)


class SymbolIds:
    """One symbol's archived ids: ``key in ids`` is exact; ``absorb`` takes stored keys in.

    The engine holds it as ``archive``. Python's ``hash`` of the key places it in the
    filters: salted per process, which is fine, since the filters are rebuilt at start.
    """

    __slots__ = ("db", "symbol", "tiers", "lookups", "false_hits", "_after", "_gen")

    def __init__(self, db: sqlite3.Connection, symbol: str, stored_up_to: int | None = None) -> None:
        self.db = db
        self.symbol = symbol
        self.tiers: list[_Tier] = []
        self.lookups = 0  # answers that went to the table: filter "present"s, and all while loading
        self.false_hits = 0  # filter "present"s that found nothing there
        # Loading (``load``): the stored ids of generations up to ``_gen`` go into the filters
        # in key order, the last one loaded is ``_after``; None: the filters are whole.
        self._after: str | None = None if stored_up_to is None else ""
        self._gen = stored_up_to

    @property
    def loading(self) -> bool:
        return self._after is not None

    def load(self, limit: int) -> int:
        """Put up to ``limit`` more of the stored ids into the filters; how many."""
        if self._after is None:
            return 0
        rows = self.db.execute("SELECT key FROM used_ids WHERE symbol = ? AND key > ? AND gen <= ? ORDER BY key "
                               "LIMIT ?", (self.symbol, self._after, self._gen, limit)).fetchall()
        self.absorb(key for (key,) in rows)
        self._after = rows[-1][0] if len(rows) == limit else None
        return len(rows)

    def __contains__(self, key: object) -> bool:
        if type(key) is not str:
            return False
        if self._after is not None:  # the filters are not whole yet: the table answers
            self.lookups += 1
            return self.db.execute("SELECT 1 FROM used_ids WHERE symbol = ? AND key = ?",
                                   (self.symbol, key)).fetchone() is not None
        if not self.tiers:
            return False
        h = hash(key)
        h1, h2 = h & _MASK32, ((h >> 32) & _MASK32) | 1
        for tier in self.tiers:
            # PROBES (4) bits, unrolled: a new id (nearly every lookup) fails at the first or
            # second in most tiers, and the loop machinery would cost more than the test
            bits, size = tier.bits, tier.size
            bit = h1 % size
            if not bits[bit >> 3] & (1 << (bit & 7)):
                continue
            bit = (h1 + h2) % size
            if not bits[bit >> 3] & (1 << (bit & 7)):
                continue
            bit = (h1 + 2 * h2) % size
            if not bits[bit >> 3] & (1 << (bit & 7)):
                continue
            bit = (h1 + 3 * h2) % size
            if bits[bit >> 3] & (1 << (bit & 7)):
                self.lookups += 1
                found = self.db.execute("SELECT 1 FROM used_ids WHERE symbol = ? AND key = ?",
                                        (self.symbol, key)).fetchone() is not None
                if not found:
                    self.false_hits += 1
                return found
        return False

    def absorb(self, keys: Iterable[str]) -> None:
        """Put keys that are in the table (committed) into the filters."""
        tiers = self.tiers
        tier = tiers[-1] if tiers else None
        for key in keys:
            if tier is None or tier.count >= tier.capacity:
                tier = _Tier(tier.capacity * 4 if tier is not None else FIRST_TIER)
                tiers.append(tier)
            h = hash(key)
            h1, h2 = h & _MASK32, ((h >> 32) & _MASK32) | 1
            bits, size = tier.bits, tier.size
            for i in range(PROBES):
                bit = (h1 + i * h2) % size
                bits[bit >> 3] |= 1 << (bit & 7)
            tier.count += 1

    @property
    def count(self) -> int:
        return sum(t.count for t in self.tiers)

    @property
    def filter_bytes(self) -> int:
        """Memory of the filters: 2 bytes an id of capacity, allocated a tier at a time."""
        return sum(len(t.bits) for t in self.tiers)


class UsedIds:
    """The archive of one matcher's data directory, one ``SymbolIds`` per symbol it owns.

    ``snapshot`` is the snapshot the engines were recovered from (``None``: none). Rows of a
    later one are dropped: that snapshot never landed (or was unreadable), so the journal
    after ``snapshot``, replayed, accepts those ids again, and the replay must find them
    unused, as they were the first time; the next snapshot's child stores them again.

    ``expected``: how many ids that snapshot says the table held (``None``: it does not say,
    a snapshot of an older zmx); ``last_segment``: the newest journal segment. Either check
    failing raises ``ArchiveMismatch`` (see the module's docstring), before any row is dropped.
    """

    def __init__(self, directory: str | Path, symbols: Iterable[str], snapshot: int | None,
                 expected: int | None = None, last_segment: int | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / FILE_NAME
        if expected and not path.exists():
            raise ArchiveMismatch(
                f"the archive of used order ids {str(path)!r} is missing, and snapshot {snapshot} says it held "
                f"{expected} id(s): a matcher without them would accept those order ids again")
        writer = _connect(path, create=True)  # the first start of a data directory makes it; writes only here
        try:
            latest = writer.execute("SELECT max(gen) FROM used_ids").fetchone()[0]
            if latest is not None and last_segment is not None and latest > last_segment:
                raise ArchiveMismatch(
                    f"journal segment journal-{latest:010d}.log is missing from {str(self.directory)!r} (the newest "
                    f"is journal-{last_segment:010d}.log): the archive of used order ids holds ids that the process "
                    f"writing snapshot {latest} stored, which it does only once that segment was started, so the "
                    "commands answered since are gone and the matcher does not start. Restore the data directory "
                    "from a backup")
            below = -1 if snapshot is None else snapshot
            writer.execute("BEGIN")
            self.dropped = writer.execute("DELETE FROM used_ids WHERE gen > ?", (below,)).rowcount
            writer.execute("DELETE FROM generations WHERE gen > ?", (below,))
            rows = writer.execute("SELECT count(*) FROM used_ids").fetchone()[0]
            if expected is not None and rows < expected:
                raise ArchiveMismatch(
                    f"the archive of used order ids {str(path)!r} holds {rows} id(s) of snapshot {snapshot} and "
                    f"before, and that snapshot says it held {expected}: the file was emptied or replaced, and a "
                    "matcher without those ids would accept them again. Restore the file from a backup")
            if _total(writer) != rows:  # an archive of an older zmx, without the count of each generation
                writer.execute("DELETE FROM generations")
                writer.execute("INSERT INTO generations SELECT gen, count(*) FROM used_ids GROUP BY gen")
            writer.execute("COMMIT")
            self.total = rows
            self.db = _connect_reader(path)
            # A read opens the write-ahead log's files for the reader before the writer closes:
            # the writer, closing last, would delete them, and a later start on a nearly full
            # disk could not make them again (its -shm is 32 KiB: "disk I/O error").
            self.db.execute("SELECT 1 FROM used_ids LIMIT 1").fetchone()
        finally:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            writer.close()
        # the stored ids go into the filters later, a slice at a time (load), while the matcher serves
        self.symbols = {symbol: SymbolIds(self.db, symbol, below if rows else None) for symbol in symbols}

    @property
    def loading(self) -> bool:
        """Whether some symbol's filters are not whole yet (``load``)."""
        return any(ids.loading for ids in self.symbols.values())

    def load(self, limit: int) -> int:
        """Put up to ``limit`` more stored ids into the filters (of the first symbol whose
        filters are not whole); how many. Lookups are exact all along."""
        for ids in self.symbols.values():
            if ids.loading:
                return ids.load(limit)
        return 0

    def load_all(self) -> None:
        while self.loading:
            self.load(10_000)

    @property
    def filter_bytes(self) -> int:
        return sum(ids.filter_bytes for ids in self.symbols.values())

    def release(self) -> None:
        """Close the connection, as before a fork: SQLite keeps per-process state about the
        files it has open, and a child that inherits it cannot use the database ("locking
        protocol"), not even through a connection of its own. ``reopen`` after the fork.
        Both are cheap (a read-only connection: see ``_connect_reader``)."""
        self.db.close()

    def reopen(self) -> None:
        self.db = _connect_reader(self.directory / FILE_NAME)
        for ids in self.symbols.values():
            ids.db = self.db

    def close(self) -> None:
        self.db.close()
