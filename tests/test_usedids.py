"""The archive of used order ids (zmx.node.usedids) and the engine's generations of them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from zmx.commands import SubmitOrder
from zmx.engine import MatchingEngine
from zmx.events import OrderAccepted, OrderRejected
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce
from zmx.node import usedids
from zmx.node.usedids import UsedIds, store

SPEC = SymbolSpec("BTC-USDT", "0.01", "0.00001")


def submit(order_id: str, account: str = "alice") -> SubmitOrder:
    return SubmitOrder(order_id, account, "BTC-USDT", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 1)


def outcome(engine: MatchingEngine, order_id: str, account: str = "alice") -> str:
    event = engine.handle(submit(order_id, account), ts_ns=1)[0]
    if type(event) is OrderAccepted:
        return "accepted"
    assert type(event) is OrderRejected
    return event.reason


def new_archive(directory: Path) -> None:
    """The archive as a matcher's first start makes it (a snapshot's child stores into it)."""
    UsedIds(directory, [], snapshot=None).close()


def test_stored_ids_are_found_exactly_and_survive_a_reopen(tmp_path: Path) -> None:
    new_archive(tmp_path)
    assert store(tmp_path, 3, [("BTC-USDT", ["alice\x00o1", "bob\x00o2"]), ("ETH-USDT", ["alice\x00o9"])]) == 3
    ids = UsedIds(tmp_path, ["BTC-USDT", "ETH-USDT"], snapshot=3)
    btc, eth = ids.symbols["BTC-USDT"], ids.symbols["ETH-USDT"]
    assert "alice\x00o1" in btc and "bob\x00o2" in btc
    assert "alice\x00o9" not in btc and "alice\x00o9" in eth  # per symbol
    assert "alice\x00o2" not in btc and "carol\x00o1" not in btc
    ids.close()
    again = UsedIds(tmp_path, ["BTC-USDT"], snapshot=7)
    assert "bob\x00o2" in again.symbols["BTC-USDT"] and again.dropped == 0
    again.close()


def test_the_serving_connection_only_reads_and_a_store_leaves_no_log_for_it_to_checkpoint(tmp_path: Path) -> None:
    # Around each fork the matcher closes its connection and opens it again. Closing the last
    # connection that may write checkpoints the write-ahead log, a stall of the loop after a
    # generation was stored: the serving connection is read-only, and the child's store
    # leaves the log empty.
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=None)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ids.db.execute("INSERT INTO used_ids VALUES (?, ?, ?)", ("BTC-USDT", "a\x00x", 1))
    ids.release()  # the fork
    ids.reopen()  # the parent goes on serving (and looking ids up) while the child stores a generation
    assert ids.db.execute("SELECT count(*) FROM used_ids").fetchone() == (0,)
    assert store(tmp_path, 1, [("BTC-USDT", [f"a\x00{i}" for i in range(5000)])]) == 5000
    wal = tmp_path / (usedids.FILE_NAME + "-wal")
    assert wal.exists() and wal.stat().st_size == 0
    ids.symbols["BTC-USDT"].absorb(f"a\x00{i}" for i in range(5000))
    assert "a\x004999" in ids.symbols["BTC-USDT"] and ids.symbols["BTC-USDT"].lookups == 1
    ids.release()
    ids.reopen()  # the next fork
    assert "a\x000" in ids.symbols["BTC-USDT"] and "a\x005000" not in ids.symbols["BTC-USDT"]
    ids.close()


def test_a_store_after_a_fork_leaves_the_write_ahead_log_files_in_place(tmp_path: Path) -> None:
    # The child's writer, closing as the last connection that had them open, would delete the
    # -wal and -shm files; making them again takes 32 KiB or more, and on a nearly full disk a
    # review saw the next start fail ("disk I/O error") and a matcher in cancels-only mode stop.
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=None)
    ids.release()  # the fork
    ids.reopen()  # the parent, before the child's store
    store(tmp_path, 1, [("BTC-USDT", ["a\x001"])])
    assert {p.name for p in tmp_path.iterdir()} >= {usedids.FILE_NAME + "-wal", usedids.FILE_NAME + "-shm"}
    ids.close()


def test_rows_of_a_snapshot_that_did_not_land_are_dropped(tmp_path: Path) -> None:
    new_archive(tmp_path)
    store(tmp_path, 2, [("BTC-USDT", ["a\x00old"])])
    store(tmp_path, 5, [("BTC-USDT", ["a\x00late"])])  # its snapshot 5 never landed
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=2)
    assert ids.dropped == 1
    assert "a\x00old" in ids.symbols["BTC-USDT"] and "a\x00late" not in ids.symbols["BTC-USDT"]
    ids.close()
    none = UsedIds(tmp_path, ["BTC-USDT"], snapshot=None)  # no snapshot: the journal has everything
    assert none.dropped == 1 and "a\x00old" not in none.symbols["BTC-USDT"]
    none.close()


def test_the_count_a_snapshot_records_is_checked_against_the_archive(tmp_path: Path) -> None:
    """Each store returns how many ids the archive holds (a snapshot records it); a start whose
    archive holds fewer than its snapshot says (lost, emptied, replaced) is refused, and so is
    one whose archive holds a generation later than the newest journal segment."""
    new_archive(tmp_path)
    assert store(tmp_path, 2, [("BTC-USDT", ["a\x00o1", "a\x00o2"]), ("ETH-USDT", ["a\x00o1"])]) == 3
    assert store(tmp_path, 3, [("BTC-USDT", ["a\x00o2", "a\x00o3"])]) == 4  # o2 stored before: counted once
    path = tmp_path / usedids.FILE_NAME
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=3, expected=4, last_segment=3)
    assert ids.total == 4 and ids.dropped == 0
    ids.close()
    missing = r"journal-0000000003.log is missing .*\(the newest is journal-0000000002.log\)"
    with pytest.raises(usedids.ArchiveMismatch, match=missing):
        UsedIds(tmp_path, ["BTC-USDT"], snapshot=2, expected=3, last_segment=2)
    # a snapshot that did not land: its rows go, and the count with them
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=2, expected=3, last_segment=3)
    assert ids.total == 3 and ids.dropped == 1
    ids.close()
    assert store(tmp_path, 4, [("BTC-USDT", ["a\x00o4"])]) == 4

    db = sqlite3.connect(path)
    db.execute("DELETE FROM used_ids WHERE key = ?", ("a\x00o1",))
    db.commit()
    db.close()
    before = path.read_bytes()
    fewer = r"holds 2 id\(s\) of snapshot 4 and before, and that snapshot says it held 4"
    with pytest.raises(usedids.ArchiveMismatch, match=fewer):
        UsedIds(tmp_path, ["BTC-USDT"], snapshot=4, expected=4, last_segment=4)
    assert path.read_bytes() == before  # refused, nothing changed
    path.unlink()
    with pytest.raises(usedids.ArchiveMismatch, match="is missing, and snapshot 4 says it held 4 id"):
        UsedIds(tmp_path, ["BTC-USDT"], snapshot=4, expected=4, last_segment=4)
    assert not path.exists()
    with pytest.raises(sqlite3.OperationalError):  # and a snapshot's child does not make a new, empty one
        store(tmp_path, 5, [("BTC-USDT", ["a\x00o5"])])
    assert not path.exists()


def test_an_archive_without_counts_gets_them_at_start(tmp_path: Path) -> None:
    """An archive written before the count of each generation (an older zmx): counted at start."""
    db = sqlite3.connect(tmp_path / usedids.FILE_NAME)
    db.execute(usedids._SCHEMA)
    db.executemany("INSERT INTO used_ids VALUES (?, ?, ?)", [("BTC-USDT", f"a\x00{i}", 1 + i % 2) for i in range(5)])
    db.commit()
    db.close()
    ids = UsedIds(tmp_path, ["BTC-USDT"], snapshot=2, expected=None, last_segment=2)
    assert ids.total == 5 and "a\x004" in ids.symbols["BTC-USDT"]
    ids.close()
    assert store(tmp_path, 3, [("BTC-USDT", ["a\x009"])]) == 6


def test_the_filter_answers_present_wrongly_at_times_but_the_table_corrects_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usedids, "FIRST_TIER", 16)  # tiny filters: 16, 64, 256, 1024 ids
    used = [f"a\x00{i}" for i in range(1000)]
    new_archive(tmp_path)
    store(tmp_path, 1, [("BTC-USDT", used)])
    archive = UsedIds(tmp_path, ["BTC-USDT"], snapshot=1)
    archive.load_all()
    ids = archive.symbols["BTC-USDT"]
    assert [t.capacity for t in ids.tiers] == [16, 64, 256, 1024] and ids.count == 1000
    assert ids.filter_bytes == (16 + 64 + 256 + 1024) * 2  # 16 bits an id of capacity
    assert all(key in ids for key in used)
    assert not any(f"b\x00{i}" in ids for i in range(5000))
    assert ids.false_hits > 0  # the filters did say "present" for some unused ids


def test_an_engine_checks_the_generation_being_archived_and_its_archive() -> None:
    engine = MatchingEngine(SPEC)
    assert outcome(engine, "o1") == "accepted"
    engine.hand_over_used_ids()  # o1 is being archived: still used
    assert engine.handed == 1
    assert outcome(engine, "o1") == "duplicate_order_id"
    assert outcome(engine, "o2") == "accepted"
    with pytest.raises(RuntimeError):
        engine.hand_over_used_ids()  # one generation at a time
    archive: set[str] = set()
    engine.archive = archive
    archive.update(engine.take_handed(10))  # the archive has it now; the engine forgot it
    assert engine.handed == 0 and archive == {"alice\x00o1"}
    assert outcome(engine, "o1") == "duplicate_order_id"
    assert outcome(engine, "o1", account="bob") == "accepted"
    assert engine.pop_used_ids() == {"alice\x00o2", "bob\x00o1"}
    assert outcome(engine, "o3") == "accepted"
    engine.hand_over_used_ids()
    engine.keep_handed()  # the archive could not store them: back in the current generation
    assert engine.handed == 0 and outcome(engine, "o3") == "duplicate_order_id"


def test_a_snapshot_holds_the_current_and_handed_generations_not_the_archive() -> None:
    engine = MatchingEngine(SPEC)
    engine.archive = {"alice\x00old"}
    for order_id in ("o1", "o2"):
        assert outcome(engine, order_id) == "accepted"
    engine.hand_over_used_ids()
    assert outcome(engine, "o3") == "accepted"
    restored = MatchingEngine.restore(engine.snapshot())
    assert [outcome(restored, oid) for oid in ("o1", "o2", "o3", "old")] == \
        ["duplicate_order_id"] * 3 + ["accepted"]  # "old" is in the archive, not the snapshot


def test_the_filters_fill_a_slice_at_a_time_after_the_start_and_every_lookup_is_exact_meanwhile(
        tmp_path: Path) -> None:
    """A matcher is ready without first scanning its archive (12 million ids kept one from
    being ready for 24 s): the stored ids go into the filters a slice at a time, and until a
    symbol's filters are whole its lookups ask the table. Ids of a generation after the
    snapshot the matcher started from (absorbed by then, or dropped) are not loaded twice."""
    new_archive(tmp_path)
    btc = [f"a\x00b{i}" for i in range(2500)]
    store(tmp_path, 1, [("BTC-USDT", btc[:2000]), ("ETH-USDT", ["a\x00e1", "a\x00e2"])])
    store(tmp_path, 2, [("BTC-USDT", btc[2000:])])
    archive = UsedIds(tmp_path, ["BTC-USDT", "ETH-USDT"], snapshot=2)
    ids = archive.symbols["BTC-USDT"]
    assert archive.loading and ids.count == 0 and archive.total == 2502
    assert btc[0] in ids and btc[-1] in ids and "a\x00new" not in ids  # the table answered
    assert ids.lookups == 3
    store(tmp_path, 3, [("BTC-USDT", ["a\x00late"])])  # a snapshot's child, meanwhile: absorbed from memory
    loaded = []
    while archive.loading:
        loaded.append(archive.load(1000))
    assert loaded == [1000, 1000, 500, 2]  # BTC-USDT in three slices (the last one short), then ETH-USDT
    assert ids.count == 2500 and archive.symbols["ETH-USDT"].count == 2
    lookups = ids.lookups
    assert all(key in ids for key in btc)
    assert "a\x00new" not in ids and "a\x00e1" not in ids and "a\x00e1" in archive.symbols["ETH-USDT"]
    assert ids.lookups - lookups == len(btc) + ids.false_hits  # now a "present" of the filters goes to the table
    archive.close()
    (tmp_path / "empty").mkdir()
    empty = UsedIds(tmp_path / "empty", ["BTC-USDT"], snapshot=None)
    assert not empty.loading  # nothing stored: nothing to fill
    empty.close()
