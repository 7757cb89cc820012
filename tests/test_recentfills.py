"""``RecentFills``: a matcher's recent fills of resting orders, by account, against a plain
list of every fill as the model (seeded)."""

from __future__ import annotations

import random

import pytest

from zmx.node.recentfills import RecentFills

SECOND = 1_000_000_000


def test_an_accounts_fills_after_the_trade_ids_given_per_symbol() -> None:
    fills = RecentFills(since_ns=100)
    fills.add("alice", "BTC-USDT", 1, 200, b"a1")
    fills.add("bob", "BTC-USDT", 2, 200, b"b2")
    fills.add("alice", "SOL-USDT", 1, 300, b"a1s")
    fills.add("alice", "BTC-USDT", 3, 400, b"a3")
    fills._check()
    assert fills.of("alice", {"BTC-USDT": 0, "SOL-USDT": 0}) == [b"a1", b"a1s", b"a3"]
    assert fills.of("alice", {"BTC-USDT": 1}) == [b"a3"]  # a symbol left out is not asked for
    assert fills.of("alice", {}) == [] and fills.of("carol", {"BTC-USDT": 0}) == []
    assert fills.complete_since_ns == 100


def test_fills_leave_by_age_and_by_count_and_the_answer_says_since_when_it_is_whole() -> None:
    fills = RecentFills(since_ns=0, retain_s=10, limit=3)
    for n in range(1, 4):
        fills.add("alice", "BTC-USDT", n, n * SECOND, f"f{n}".encode())
    fills.add("bob", "BTC-USDT", 4, 4 * SECOND, b"f4")  # over the limit: alice's oldest leaves
    fills._check()
    assert len(fills) == 3 and fills.of("alice", {"BTC-USDT": 0}) == [b"f2", b"f3"]
    assert fills.complete_since_ns == SECOND + 1  # fills stamped 1 s may be gone
    fills.expire(13 * SECOND + 1)  # older than 10 s: stamped 2 and 3 s
    fills._check()
    assert fills.of("alice", {"BTC-USDT": 0}) == [] and fills.of("bob", {"BTC-USDT": 0}) == [b"f4"]
    assert fills.complete_since_ns == 3 * SECOND + 1
    with pytest.raises(ValueError):
        RecentFills(0, limit=0)


def test_random_adds_and_expiries_match_a_plain_list() -> None:
    rng = random.Random(3)
    fills = RecentFills(since_ns=0, retain_s=15, limit=200)  # 200 fills are about 21 s here: both bounds bite
    every: list[tuple[int, str, str, int, bytes]] = []  # all fills ever: (ts, account, symbol, trade id, record)
    trade_ids = {"BTC-USDT": 0, "SOL-USDT": 0}
    now = 0
    dropped_by = {"age": 0, "count": 0}
    for step in range(5000):
        now += rng.randint(0, 2) * SECOND // 10
        held = len(fills)
        if rng.random() < 0.05:
            fills.expire(now)
            dropped_by["age"] += held - len(fills)
            kept = every[len(every) - len(fills):]
            assert all(ts >= now - 15 * SECOND for ts, *_ in kept)
            assert len(every) == len(kept) or every[-len(kept) - 1][0] < now - 15 * SECOND
        else:
            symbol = rng.choice(tuple(trade_ids))
            trade_ids[symbol] += 1
            account = f"a{rng.randrange(6)}"
            every.append((now, account, symbol, trade_ids[symbol], f"{step}".encode()))
            fills.add(account, symbol, trade_ids[symbol], now, every[-1][4])
            dropped_by["count"] += held + 1 - len(fills)
        if step % 97 == 0:
            fills._check()
            kept = every[len(every) - len(fills):]  # the newest fills are held
            assert all(f in kept for f in every if f[0] >= fills.complete_since_ns)
            for account in ("a0", "a3"):
                after = {"BTC-USDT": rng.randint(0, trade_ids["BTC-USDT"]), "SOL-USDT": 0}
                assert fills.of(account, after) == [
                    record for _, owner, symbol, trade_id, record in kept
                    if owner == account and trade_id > after[symbol]]
    assert dropped_by["age"] > 100 and dropped_by["count"] > 100
