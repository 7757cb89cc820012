"""The L2 view: checksum, level formatting, and the mirror kept from snapshot + diffs."""

from __future__ import annotations

import random
import zlib

import pytest

from zmx.depth import CHECKSUM_DEPTH, L2Mirror, book_checksum, checksum, format_levels
from zmx.events import BookChanged
from zmx.exceptions import SequenceGap
from zmx.model import SymbolSpec

SYM = "BTC-USDT"
SPEC = SymbolSpec(SYM, "0.01", "0.00001")


def change(seq: int, bids=(), asks=()) -> BookChanged:
    return BookChanged(SYM, seq, 1_000 + seq, tuple(bids), tuple(asks))


# -- checksum -------------------------------------------------------------------------------


def test_checksum_worked_example_from_the_docstring():
    bids = [("30000", "1.5"), ("29999.5", "0.25")]
    asks = [("30001", "2")]
    assert checksum(bids, asks) == zlib.crc32(b"30000:1.5:30001:2:29999.5:0.25")
    assert checksum(bids, asks) == 1958360348


def test_checksum_skips_the_side_that_runs_out():
    bids = [("10", "1"), ("9", "2"), ("8", "3")]
    asks = [("11", "4")]
    assert checksum(bids, asks) == zlib.crc32(b"10:1:11:4:9:2:8:3")
    # and the other way round
    assert checksum(asks, bids) == zlib.crc32(b"11:4:10:1:9:2:8:3")
    assert checksum([], asks) == zlib.crc32(b"11:4")
    assert checksum(bids[:1], []) == zlib.crc32(b"10:1")


def test_checksum_of_an_empty_book_is_zero():
    assert checksum([], []) == 0 == zlib.crc32(b"")


def test_checksum_writes_strings_exactly_as_given():
    # "1.50" and "1.5" are the same number but not the same text
    assert checksum([("30000", "1.50")], []) == zlib.crc32(b"30000:1.50")
    assert checksum([("30000", "1.50")], []) != checksum([("30000", "1.5")], [])
    # JSON gives lists, not tuples
    assert checksum([["30000", "1.5"]], [["30001", "2"]]) == zlib.crc32(b"30000:1.5:30001:2")


def test_checksum_covers_only_the_top_25_levels_of_each_side():
    assert CHECKSUM_DEPTH == 25
    bids = [(str(100 - i), "1") for i in range(30)]  # 100 .. 71
    asks = [(str(200 + i), "2") for i in range(27)]  # 200 .. 226
    expected = (
        "100:1:200:2:99:1:201:2:98:1:202:2:97:1:203:2:96:1:204:2:"
        "95:1:205:2:94:1:206:2:93:1:207:2:92:1:208:2:91:1:209:2:"
        "90:1:210:2:89:1:211:2:88:1:212:2:87:1:213:2:86:1:214:2:"
        "85:1:215:2:84:1:216:2:83:1:217:2:82:1:218:2:81:1:219:2:"
        "80:1:220:2:79:1:221:2:78:1:222:2:77:1:223:2:76:1:224:2"
    )
    assert checksum(bids, asks) == zlib.crc32(expected.encode())
    # a change below the 25th level is invisible, one at the 25th is not
    assert checksum(bids[:25], asks[:25]) == checksum(bids, asks)
    assert checksum(bids[:25] + [("1", "9")], asks) == checksum(bids, asks)
    assert checksum(bids[:24] + [("76", "3")], asks) != checksum(bids, asks)


def test_checksum_with_one_side_deeper_than_25_and_the_other_short():
    bids = [(str(100 - i), "1") for i in range(30)]
    asks = [("200", "2"), ("201", "2")]
    expected = "100:1:200:2:99:1:201:2:" + ":".join(f"{100 - i}:1" for i in range(2, 25))
    assert expected.endswith("77:1:76:1")  # the hand check of the line above
    assert checksum(bids, asks) == zlib.crc32(expected.encode())


# -- format_levels / book_checksum ---------------------------------------------------------


def test_format_levels_writes_prices_and_quantities_on_the_symbols_grid():
    levels = [(3000000, 150000), (3000050, 1), (3000001, 25000), (2999999, 0)]
    assert format_levels(SPEC, levels) == [
        ["30000", "1.5"],
        ["30000.5", "0.00001"],
        ["30000.01", "0.25"],
        ["29999.99", "0"],  # 0 lots = the level is gone
    ]
    assert format_levels(SPEC, []) == []


def test_book_checksum_is_the_checksum_of_the_formatted_levels():
    bids = [(3000000, 150000), (2999950, 25000)]
    asks = [(3000100, 200000)]
    assert book_checksum(SPEC, bids, asks) == zlib.crc32(b"30000:1.5:30001:2:29999.5:0.25")


def test_book_checksum_reads_only_the_top_25():
    bids = [(1000 - i, 1) for i in range(40)]
    asks = [(2000 + i, 1) for i in range(40)]
    assert book_checksum(SPEC, bids, asks) == book_checksum(SPEC, bids[:25], asks[:25])
    assert book_checksum(SPEC, iter(bids), iter(asks)) == book_checksum(SPEC, bids, asks)


# -- L2Mirror: synced --------------------------------------------------------------------------


def synced_mirror(seq: int = 10) -> L2Mirror:
    mirror = L2Mirror(SYM)
    assert mirror.load_snapshot(seq, [(100, 5), (99, 3)], [(101, 2), (103, 7)]) == []
    return mirror


def test_a_new_mirror_is_unsynced_and_empty():
    mirror = L2Mirror(SYM)
    assert mirror.symbol == SYM
    assert mirror.seq is None
    assert not mirror.synced
    assert mirror.levels() == ([], [])
    assert mirror.checksum(SPEC) == 0
    mirror._check()


def test_snapshot_then_diffs():
    mirror = synced_mirror(10)
    assert mirror.synced and mirror.seq == 10
    assert mirror.levels() == ([(100, 5), (99, 3)], [(101, 2), (103, 7)])

    assert mirror.apply(change(11, bids=[(100, 4), (98, 1)], asks=[(102, 9)])) is True
    assert mirror.seq == 11
    assert mirror.levels() == ([(100, 4), (99, 3), (98, 1)], [(101, 2), (102, 9), (103, 7)])
    mirror._check()


def test_zero_lots_removes_a_level_and_an_absent_one_is_tolerated():
    mirror = synced_mirror(10)
    assert mirror.apply(change(11, bids=[(100, 0)], asks=[(101, 0), (150, 0)])) is True
    assert mirror.levels() == ([(99, 3)], [(103, 7)])
    assert mirror.seq == 11
    mirror._check()


def test_duplicates_and_old_updates_are_ignored():
    mirror = synced_mirror(10)
    first = change(11, bids=[(100, 1)])
    assert mirror.apply(first) is True
    before = mirror.levels()
    assert mirror.apply(first) is False
    assert mirror.apply(change(11, bids=[(100, 42)])) is False
    assert mirror.apply(change(3, asks=[(101, 0)])) is False
    assert mirror.apply(change(10, asks=[(101, 0)])) is False
    assert mirror.levels() == before
    assert mirror.seq == 11


def test_a_gap_raises_and_unsyncs():
    mirror = synced_mirror(10)
    later = change(13, bids=[(100, 1)])
    with pytest.raises(SequenceGap) as info:
        mirror.apply(later)
    assert (info.value.symbol, info.value.expected, info.value.got) == (SYM, 11, 13)
    assert not mirror.synced and mirror.seq is None
    assert mirror.levels() == ([], [])
    mirror._check()
    # further updates are buffered until a new snapshot
    assert mirror.apply(change(14, asks=[(101, 1)])) is False
    # the update that showed the gap is kept: a snapshot at 12 bridges it
    assert mirror.load_snapshot(12, [(100, 9)], [(101, 9)]) == [later, change(14, asks=[(101, 1)])]
    assert mirror.seq == 14
    assert mirror.levels() == ([(100, 1)], [(101, 1)])


def test_a_gap_then_a_snapshot_past_the_buffer_drops_it_all():
    mirror = synced_mirror(10)
    with pytest.raises(SequenceGap):
        mirror.apply(change(13, bids=[(100, 1)]))
    assert mirror.load_snapshot(20, [(100, 2)], []) == []
    assert mirror.seq == 20
    assert mirror.levels() == ([(100, 2)], [])
    mirror._check()


def test_an_update_of_another_symbol_is_refused():
    mirror = synced_mirror(10)
    with pytest.raises(ValueError):
        mirror.apply(BookChanged("ETH-USDT", 11, 0, ((100, 1),), ()))
    assert mirror.seq == 10


def test_levels_orders_bids_high_to_low_and_asks_low_to_high_and_limits():
    mirror = L2Mirror(SYM)
    # snapshot levels in scrambled order still come out best first
    mirror.load_snapshot(1, [(97, 1), (100, 2), (98, 3), (99, 4)], [(105, 1), (101, 2), (103, 3)])
    assert mirror.levels() == ([(100, 2), (99, 4), (98, 3), (97, 1)], [(101, 2), (103, 3), (105, 1)])
    assert mirror.levels(2) == ([(100, 2), (99, 4)], [(101, 2), (103, 3)])
    assert mirror.levels(0) == ([], [])
    assert mirror.levels(10) == mirror.levels()


def test_mirror_checksum_equals_book_checksum_of_its_levels():
    mirror = L2Mirror(SYM)
    bids = [(3000000 - 50 * i, 1000 + i) for i in range(30)]
    asks = [(3000100 + 50 * i, 2000 + i) for i in range(30)]
    mirror.load_snapshot(7, bids, asks)
    assert mirror.checksum(SPEC) == book_checksum(SPEC, bids, asks)
    assert mirror.checksum(SPEC) == checksum(format_levels(SPEC, bids[:25]), format_levels(SPEC, asks[:25]))


def test_mirror_checksum_follows_updates_in_the_top_levels_and_keeps_through_deeper_ones():
    # the mirror keeps its checksum until an update reaches a side's top 25 levels
    mirror = L2Mirror(SYM)
    bids = {3000000 - i: 100 + i for i in range(40)}  # levels 1-40: 3000000 down to 2999961
    asks = {3001000 + i: 200 + i for i in range(40)}
    mirror.load_snapshot(0, sorted(bids.items(), reverse=True), sorted(asks.items()))
    before = mirror.checksum(SPEC)
    steps = [
        ([(2999950, 7)], [], False),  # a new bid level 41
        ([(2999961, 0)], [], False),  # bid level 40 removed
        ([], [(3001030, 9)], False),  # ask level 31 changed
        ([(2999990, 0)], [], True),  # bid level 11 removed: level 26 moves up into the checksum
        ([], [(3000999, 5)], True),  # a new best ask
        ([(2999975, 1)], [], True),  # the 25th bid's quantity (3000000-2999991, then 2999989 down)
        ([(2999974, 0)], [], False),  # the 26th bid removed
        ([(2999973, 0), (3000001, 3)], [], True),  # a deep removal with a new best bid in the same update
    ]
    for seq, (bid_levels, ask_levels, moves) in enumerate(steps, start=1):
        for book, levels in ((bids, bid_levels), (asks, ask_levels)):
            for ticks, lots in levels:
                if lots:
                    book[ticks] = lots
                else:
                    book.pop(ticks, None)
        assert mirror.apply(change(seq, bid_levels, ask_levels))
        now = mirror.checksum(SPEC)
        assert now == book_checksum(SPEC, sorted(bids.items(), reverse=True), sorted(asks.items())), seq
        assert (now != before) == moves, seq
        before = now


def test_mirror_checksum_follows_the_spec_it_is_given():
    # the mirror memoises level texts; another grid must not reuse them
    mirror = L2Mirror(SYM)
    mirror.load_snapshot(1, [(3000000, 150000)], [(3000100, 200000)])
    other = SymbolSpec(SYM, "0.1", "0.001")
    assert mirror.checksum(SPEC) == zlib.crc32(b"30000:1.5:30001:2")
    assert mirror.checksum(other) == zlib.crc32(b"300000:150:300010:200")
    assert mirror.checksum(SPEC) == zlib.crc32(b"30000:1.5:30001:2")
    mirror.apply(change(2, bids=[(3000000, 1)]))
    assert mirror.checksum(SPEC) == zlib.crc32(b"30000:0.00001:30001:2")


def test_reset_forgets_everything():
    mirror = synced_mirror(10)
    mirror.reset()
    assert not mirror.synced and mirror.levels() == ([], [])
    mirror.apply(change(11, bids=[(1, 1)]))
    mirror.reset()
    assert mirror.buffered == 0
    assert mirror.load_snapshot(30, [], []) == []
    assert mirror.seq == 30


def test_a_second_snapshot_replaces_the_book():
    mirror = synced_mirror(10)
    mirror.apply(change(11, bids=[(50, 1)]))
    assert mirror.load_snapshot(40, [(60, 1)], [(70, 1)]) == []
    assert mirror.seq == 40
    assert mirror.levels() == ([(60, 1)], [(70, 1)])


def test_snapshot_levels_with_zero_lots_are_not_kept():
    mirror = L2Mirror(SYM)
    mirror.load_snapshot(1, [(100, 0), (99, 1)], [(101, 0)])
    assert mirror.levels() == ([(99, 1)], [])
    mirror._check()


# -- L2Mirror: buffering before the snapshot (Clone pattern) ----------------------------------


def test_updates_before_the_snapshot_are_buffered_and_bridged():
    mirror = L2Mirror(SYM)
    updates = [change(s, bids=[(100, s)]) for s in range(5, 10)]  # seq 5..9
    for u in updates:
        assert mirror.apply(u) is False
    assert mirror.buffered == 5
    assert not mirror.synced and mirror.levels() == ([], [])

    applied = mirror.load_snapshot(6, [(100, 6)], [(101, 1)])
    assert applied == updates[2:]  # 7, 8, 9
    assert [u.seq for u in applied] == [7, 8, 9]
    assert mirror.seq == 9
    assert mirror.levels() == ([(100, 9)], [(101, 1)])
    assert mirror.buffered == 0
    mirror._check()
    assert mirror.apply(change(10, asks=[(101, 0)])) is True


def test_a_snapshot_at_or_after_the_whole_buffer_applies_nothing():
    mirror = L2Mirror(SYM)
    for s in range(5, 10):
        mirror.apply(change(s, bids=[(100, s)]))
    assert mirror.load_snapshot(9, [(100, 99)], []) == []
    assert mirror.seq == 9 and mirror.levels() == ([(100, 99)], [])


def test_repeats_in_the_buffer_are_skipped():
    mirror = L2Mirror(SYM)
    for s in (5, 6, 6, 7, 5, 7, 8):
        mirror.apply(change(s, bids=[(100, s)]))
    applied = mirror.load_snapshot(5, [], [])
    assert [u.seq for u in applied] == [6, 7, 8]
    assert mirror.seq == 8


def test_a_hole_between_snapshot_and_buffer_raises_and_stays_unsynced():
    mirror = L2Mirror(SYM)
    for s in range(8, 12):
        mirror.apply(change(s, bids=[(100, s)]))
    with pytest.raises(SequenceGap) as info:
        mirror.load_snapshot(5, [(100, 5)], [])  # 6 and 7 are missing
    assert (info.value.expected, info.value.got) == (6, 8)
    assert not mirror.synced and mirror.levels() == ([], [])
    mirror._check()
    # the buffer is kept: a newer snapshot can still bridge it
    assert [u.seq for u in mirror.load_snapshot(9, [], [])] == [10, 11]
    assert mirror.seq == 11


def test_a_hole_inside_the_buffer_raises():
    mirror = L2Mirror(SYM)
    for s in (6, 7, 9, 10):
        mirror.apply(change(s, bids=[(100, s)]))
    with pytest.raises(SequenceGap) as info:
        mirror.load_snapshot(5, [], [])
    assert (info.value.expected, info.value.got) == (8, 9)
    assert not mirror.synced
    assert mirror.buffered == 2  # 9 and 10
    assert [u.seq for u in mirror.load_snapshot(8, [], [])] == [9, 10]


def test_buffer_overflow_drops_the_oldest_and_the_snapshot_notices():
    mirror = L2Mirror(SYM, max_buffered=3)
    for s in range(5, 10):  # 5 and 6 are dropped
        mirror.apply(change(s, bids=[(100, s)]))
    assert mirror.buffered == 3
    with pytest.raises(SequenceGap):
        mirror.load_snapshot(5, [], [])
    assert not mirror.synced
    assert [u.seq for u in mirror.load_snapshot(6, [], [])] == [7, 8, 9]


def test_default_buffer_bound():
    mirror = L2Mirror(SYM)
    for s in range(100_010):
        mirror.apply(BookChanged(SYM, s, 0, (), ()))
    assert mirror.buffered == 100_000


# -- stress against a plain-dict model ------------------------------------------------------


def model_levels(bids: dict[int, int], asks: dict[int, int]):
    return (sorted(bids.items(), reverse=True), sorted(asks.items()))


def random_change(rng: random.Random, seq: int, bids: dict[int, int], asks: dict[int, int]) -> BookChanged:
    """A random diff; updates the model dicts as it goes."""
    sides = []
    for book, best_first in ((bids, True), (asks, False)):
        touched: dict[int, int] = {}
        for _ in range(rng.choice((0, 1, 1, 2, 3, 5))):
            if book and rng.random() < 0.4:
                ticks = rng.choice(list(book))
            else:
                ticks = rng.randint(1, 80)  # a small range, so levels are hit again
            lots = 0 if rng.random() < 0.35 else rng.randint(1, 10**6)
            touched[ticks] = lots
        for ticks, lots in touched.items():
            if lots:
                book[ticks] = lots
            else:
                book.pop(ticks, None)
        sides.append(tuple(sorted(touched.items(), reverse=best_first)))
    return BookChanged(SYM, seq, seq, sides[0], sides[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mirror_matches_a_dict_model_over_random_diffs(seed):
    rng = random.Random(seed)
    bids: dict[int, int] = {}
    asks: dict[int, int] = {}
    mirror = L2Mirror(SYM)
    mirror.load_snapshot(0, [], [])
    late = L2Mirror(SYM)  # joins later, Clone-pattern style
    late_snapshot_at = rng.randint(200, 400)
    late_subscribed_at = late_snapshot_at - rng.randint(0, 50)
    late_snapshot = None
    forwarded: list[BookChanged] = []
    previous = None
    depths = []
    for seq in range(1, 1501):
        diff = random_change(rng, seq, bids, asks)
        assert mirror.apply(diff) is True
        if previous is not None and rng.random() < 0.05:
            assert mirror.apply(previous) is False  # a repeat is ignored
        previous = diff
        expected = model_levels(bids, asks)
        depths.append(min(len(bids), len(asks)))
        assert mirror.seq == seq
        assert mirror.levels() == expected
        assert mirror.levels(CHECKSUM_DEPTH) == (expected[0][:25], expected[1][:25])
        assert mirror.checksum(SPEC) == book_checksum(SPEC, *expected)

        # the late joiner subscribes, buffers, gets a snapshot taken at late_snapshot_at
        # only 20 updates later, and must then follow exactly
        if seq >= late_subscribed_at and late.apply(diff):
            forwarded.append(diff)
        if seq == late_snapshot_at:
            late_snapshot = expected
        if seq == late_snapshot_at + 20:
            forwarded.extend(late.load_snapshot(late_snapshot_at, *late_snapshot))
            assert [u.seq for u in forwarded] == list(range(late_snapshot_at + 1, seq + 1))
        if late.synced:
            assert late.levels() == expected
            assert late.checksum(SPEC) == mirror.checksum(SPEC)
        if seq % 100 == 0:
            mirror._check()
            late._check()
    assert late.synced and late.seq == mirror.seq == 1500
    # the book was deeper than the checksum for most of the run, so truncation mattered
    assert sum(d > CHECKSUM_DEPTH for d in depths) > 1000
