"""The rows each benchmark contributes to the README's performance table.

Every results file carries them as ``summary``: a list of rows with the table's columns
(``benchmark``, ``zmx``, ``baseline``, ``ratio``, ``target``, ``met``), all text but ``met``
(true, false, or null where there is no target). ``zmx bench report`` puts the rows of every
results file into the README as they are, so a new benchmark only has to write its own rows:
``figures["summary"] = summaries.summarize("NAME", figures)`` with a function here, or rows
built in the benchmark itself with ``row``.

``python perf/summaries.py perf/results/engine.json ...`` (re)computes the summary of results
files from their figures, e.g. for files written before the benchmark wrote one.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
COLUMNS = ("benchmark", "zmx", "baseline", "ratio", "target", "met")
METADATA = ("python", "implementation", "platform", "machine", "cpu_count", "cpu_usable", "loadavg", "commit",
            "timestamp")  # what _common.write_results appends; a recomputed summary goes before it


def row(benchmark: str, zmx: str, baseline: str = "", ratio: str = "", target: str = "",
        met: bool | None = None) -> Row:
    """One row of the performance table."""
    return {"benchmark": benchmark, "zmx": zmx, "baseline": baseline, "ratio": ratio, "target": target, "met": met}


def approx(x: float) -> str:
    """``x`` to a round figure for a ``~`` (126,111 -> 125,000): the nearest half unit of its
    second significant digit."""
    if x <= 0:
        return "0"
    step = 5 * 10 ** max(0, int(math.log10(x)) - 2)
    return f"{round(x / step) * step:,}"


def engine(f: dict[str, Any]) -> list[Row]:
    t = f["targets"]
    if f.get("engine_ops_per_s") is None:
        zmx, ratio = "not measured (--no-engine or no zmx.engine)", ""
    else:
        zmx, ratio = f"{f['engine_ops_per_s']:,} ops/s, {f['events_per_op']:.1f} events/op", f"{f['ratio']:.2f}x"
    rows = [row(f"`perf/bench_engine.py` (`engine.json`): {f['ops']:,} commands through `MatchingEngine.handle`, "
                "every event built", zmx,
                f"bare dict + SortedList + deque book, no events: {f['baseline_ops_per_s']:,} ops/s", ratio,
                f">= {t['engine_ops_per_s']:,} ops/s and >= {t['ratio']}x", t["met"])]
    if "codec_ns_per_event_encode" in f:
        rows.append(row("codec (`engine.json`)", f"encode {f['codec_ns_per_event_encode'] / 1000:.1f} us, "
                        f"decode {f['codec_ns_per_event_decode'] / 1000:.1f} us per event", target="measured"))
    return rows


def _plural(n: int | str, noun: str) -> str:
    return f"{n} {noun}{'' if str(n) == '1' else 's'}"


def orders(f: dict[str, Any]) -> list[Row]:
    keys = sorted(f["zmx"], key=lambda key: int(key.split("_")[0]))  # "1_matcher", "2_matcher"
    n = [int(key.split("_")[0]) for key in keys]
    zmx = [f["zmx"][key] for key in keys]
    t, ceiling = f["targets"], f["ceiling"]
    # "11,014 orders/s (1 matcher), 10,169 (2)": the unit and noun once, on the first
    rates = [f"{z['orders_per_s']:,} ({k})" for k, z in zip(n, zmx, strict=True)]
    rates[0] = f"{zmx[0]['orders_per_s']:,} orders/s ({_plural(n[0], 'matcher')})"
    baseline = f"bare Python ROUTER->DEALER loop to an echo: {ceiling['python_loop']['round_trips_per_s']:,}/s"
    if "zmq_proxy" in ceiling:
        baseline += f" (zmq.proxy in C: {ceiling['zmq_proxy']['round_trips_per_s']:,})"
    half = [z["half_rate"]["ack_us"] for z in zmx]
    latency = [f"p99 {h['p99'] / 1000:.1f} ms ({k})" for k, h in zip(n, half, strict=True)]
    latency[0] = f"p50 {half[0]['p50'] / 1000:.1f} ms, p99 {half[0]['p99'] / 1000:.1f} ms ({_plural(n[0], 'matcher')})"
    loop = zmx[0]["half_rate"]["python_loop_same_rate"]["ack_us"]
    return [
        row(f"`perf/bench_orders.py` (`orders.json`): pipelined orders client -> router -> matcher -> ack, "
            f"`fsync: {f['fsync']}`", ", ".join(rates), baseline,
            ", ".join(f"{z['ratio_to_python_loop']:.2f}x" for z in zmx), f">= {t['ratio']}x",
            all(t[key]["ratio_met"] for key in keys)),
        row("same, ack latency at half the maximum rate", "; ".join(latency),
            f"the bare loop at the same rate: p99 {loop['p99'] / 1000:.1f} ms", "",
            f"p99 <= {t['ack_p99_ms_at_half_rate']:g} ms", all(t[key]["ack_p99_met"] for key in keys)),
    ]


def pub(f: dict[str, Any]) -> list[Row]:
    counts = sorted(f["symbol_counts"], key=int)
    entries = [f["symbol_counts"][key] for key in counts]
    rates = [f"{e['zmx']['publications_per_s']:,} ({k})" for k, e in zip(counts, entries, strict=True)]
    rates[0] = f"{entries[0]['zmx']['publications_per_s']:,}/s ({_plural(counts[0], 'symbol')})"
    gaps = sum(e["zmx"]["gaps_all_rounds"] for e in entries)
    missing = sum(e["zmx"].get("missing_all_rounds", 0) for e in entries)
    zmx = f"{', '.join(rates)}; {gaps:,} gaps" + (f", {missing:,} missing" if missing else "")
    ceiling = [e["probe_ceiling"]["publications_per_s"] for e in entries]
    ceiling_gaps = sum(e["probe_ceiling"]["gaps_all_rounds"] for e in entries)
    ratio = f"{sum(e['ratio_to_probe_ceiling'] for e in entries) / len(entries):.2f}x"
    # Publications/s equal to the acks/s: the matcher publishes all it is given, the orders limit it.
    if all(abs(e["zmx"]["publications_per_s"] - e["zmx"]["driver"]["acks_per_s"])
           <= 0.02 * e["zmx"]["publications_per_s"] for e in entries):
        ratio += " (the order path limits it)"
    return [row("`perf/bench_pub.py` (`pub.json`): publications a matcher sends and a probe receives", zmx,
                f"the probe's own ceiling: ~{approx(sum(ceiling) / len(ceiling))}/s, {ceiling_gaps:,} gaps", ratio,
                "no gaps at the sustained rate", f["no_gaps_at_sustained_rate"])]


def hosts(f: dict[str, Any]) -> list[Row]:
    c1, c2, c3 = (f["claims"][k] for k in ("1_gateway_cpu_flat", "2_matcher_cost_by_relays", "3_delivered_scales"))
    cfg = f["config"]
    load = f"{cfg['clients_per_gateway']} connections x {cfg['channels_per_client']} channels per gateway"
    g_cpu = c1["gateway_cpu_us_per_delivered"]
    first = min(g_cpu, key=int)
    rows = [row(f"`perf/bench_hosts.py` (`hosts.json`): hosts as network namespaces, {load}, "
                f"{cfg['rate_orders_per_s']:g} orders/s; (1) gateway CPU per delivered message vs gateways",
                ", ".join(f"{v:.2f} us (G={g})" for g, v in sorted(g_cpu.items(), key=lambda kv: int(kv[0]))),
                f"one gateway: {g_cpu[first]:.2f} us", f"{c1['ratio_max_to_first']:.2f}x (largest / one)",
                "does not grow with the gateways", c1["met"])]
    io = c2["matcher_io_thread_us_per_published"]["by_direct_subscribers"]
    m_g = c2["matcher_cpu_us_per_published"]["by_gateways_one_relay"]
    m_n = c2["matcher_cpu_us_per_published"]["by_clients_per_gateway"]

    def _x(ratio: float | None) -> str:
        return "-" if ratio is None else f"{ratio:.2f}x"

    def span(values: dict[Any, float], unit: str = " us") -> str:
        return f"{min(values.values()):.1f}-{max(values.values()):.1f}{unit}" if values else "-"

    subscribers = ", ".join(f"{v:.1f} us ({k} subscriber{'' if str(k) == '1' else 's'})"
                            for k, v in sorted(io.items(), key=lambda kv: int(kv[0])))
    rows.append(row("same, (2) matcher CPU per published message: vs gateways and clients behind one relay; "
                    "its ZeroMQ I/O thread vs the subscribers it feeds (relays, or gateways straight on it)",
                    f"whole matcher {span(m_g)} over G, {span(m_n)} over clients per gateway; I/O thread "
                    f"{subscribers}", f"largest / first over G {_x(c2.get('growth_over_gateways'))}, over clients "
                    f"{_x(c2.get('growth_over_clients'))}", f"I/O 2 relays / 1: {_x(c2['io_two_relays_over_one'])}",
                    "grows with the relays, not with the gateways or clients", c2["met"]))
    steps = c3["steps"]
    rates = ", ".join(f"{round(s['delivered_per_s']):,} (G={s['gateways']}, {s['machine_cores_busy']} cores busy)"
                      for s in steps)
    full = c3["cores_used_up_at_gateways"]
    cap = cfg.get("scale_gateway_cpu_cap")
    rows.append(row(f"same, (3) delivered messages/s vs gateway processes: {cfg['scale_clients_per_gateway']:,} "
                    f"connections x {cfg['channels_per_client']} channels per gateway, "
                    f"{cfg['scale_rate_orders_per_s']:g} orders/s"
                    + (f", each gateway host capped at {cap:g} core (a cgroup)" if cap else "")
                    + (f"; the median of {cfg['scale_repeat']} rounds per G" if cfg.get("scale_repeat", 1) > 1 else ""),
                    f"{rates}; {c3['verdict'].split(' | ')[0]}" if steps else "-", "the step before",
                    ", ".join(f"{m['ratio']:.2f}x (G={m['from']}->{m['to']})" for m in c3["moves"]),
                    f"grows while cores are idle, flat once the {c3['cores']} cores are used up"
                    + (f" (at G={full})" if full else " (not reached)"), c3["met"]))
    return rows


def fanout(f: dict[str, Any]) -> list[Row]:
    verdicts = f["targets"]["cells"]
    want = f["targets"]["wanted"]
    cells = {(c["n"], c["k"]): c for c in f["cells"]}

    def span(key: str, fmt: str = ".2f") -> str:
        values = [v[key] for v in verdicts if v.get(key) is not None]
        return f"{min(values):{fmt}}-{max(values):{fmt}}" if values else "-"

    def count(key: str) -> tuple[str, bool]:
        got = [v[key] for v in verdicts if key in v]
        return f"{sum(got)} of {len(got)} cells", bool(got) and all(got)

    n5000 = [(k, cells[(5000, k)]) for k in (1, 10) if (5000, k) in cells]
    rate = ", ".join(f"{c['gateway']['max']['delivered_per_s']:,}/s ({k} channel{'s' * (k > 1)})" for k, c in n5000)
    ceiling = ", ".join(f"{c['coalesce']['max']['delivered_per_s']:,}/s" for _, c in n5000 if c.get("coalesce"))
    rate_met = all(v.get("rate_met", True) for v in verdicts)
    cpu_text, cpu_met = count("cpu_met")
    p99_text, p99_met = count("p99_met")
    at500 = [v for v in verdicts if "p99_ms_at_500_per_process" in v]

    def kept(rnd: str) -> str:
        """The p99 ratios of a round, over the cells where the raw server kept the gateway's rate."""
        got = [v[f"p99_vs_raw_{rnd}"] for v in verdicts
               if v.get(f"raw_kept_{rnd}_rate", rnd == "moderate") and v.get(f"p99_vs_raw_{rnd}")]
        if not got:
            return f"{rnd} rate: the raw server never kept the gateway's rate"
        spread = f"{got[0]:.2f}x" if len(got) == 1 else f"{min(got):.2f}-{max(got):.2f}x"
        return f"{rnd} rate {spread} ({_plural(len(got), 'cell')})"

    what = f"N {', '.join(f'{n:,}' for n in f['config']['n'])} x {'/'.join(map(str, f['config']['k']))} channels"
    feeds = {"matcher": ", fed by the matcher's PUB as the gateway is, with the gateway's orders",
             "zeromq": ", fed over ZeroMQ as the gateway is"}
    fed = feeds.get(f["config"].get("ceiling_feed"), ", its feed made in its own loop")
    return [
        row(f"`perf/bench_fanout.py` (`fanout.json`): gateway fan-out, {what}, delivered messages/s at N = 5,000",
            rate, f"coalescing raw server: {ceiling}", "", f">= {want['delivered_per_s_at_5000']:,}/s", rate_met),
        row("same, delivered messages per gateway CPU-second vs the coalescing raw server",
            f"{span('delivered_per_cpu_s_vs_coalesce')}x ({cpu_text} met)", "raw asyncio, one write per connection "
            f"per loop turn, same feed{fed}", "", f">= {want['delivered_per_cpu_s_vs_coalesce']}x", cpu_met),
        row("same, gateway memory per idle subscribed connection", f"{span('kb_per_idle_connection')} KB", "", "",
            f"<= {want['kb_per_idle_connection']} KB", all(v["memory_met"] for v in verdicts)),
        row("same, push latency p99 (`ts` to arrival at the client) vs the one-write-per-message raw server, "
            "same N and rate", f"{kept('moderate')}; {kept('high')}; {p99_text} met",
            f"raw asyncio server at the same N and rate{fed}", "", f"<= {want['p99_vs_raw']}x", p99_met),
        row("same, push latency p99 with 500 connections per gateway process",
            ", ".join(f"{v['p99_ms_at_500_per_process']:g} ms ({v['k']} channel{'s' * (v['k'] > 1)})" for v in at500),
            feed_alone(at500), "", f"<= {want['p99_ms_at_500_per_process']:g} ms",
            all(v["p99_500_met"] for v in at500)),
    ]


def feed_alone(verdicts: list[dict[str, Any]]) -> str:
    """What the matcher's feed alone had of those p99s (a bare SUB beside the gateway; results
    files since 772fc67), then the gateway's own figures of them (its log: the feed's lag as it
    took each publication, its fan-out turns; since 1d0bd6f), or nothing."""
    def channels(v: dict[str, Any]) -> str:
        return f"{v['k']} channel{'s' * (v['k'] > 1)}"
    parts = []
    got = [v for v in verdicts if v.get("moderate_feed_p99_ms") is not None]
    if got:
        parts.append("the matcher's feed alone, at a bare SUB in the same rounds: " + ", ".join(
            f"p99 {v['moderate_feed_p99_ms']:g} ms ({channels(v)})" for v in got))
    own = [v for v in verdicts if v.get("moderate_gateway_turn_p99_ms") is not None]
    if own:
        parts.append("the gateway's own log: " + ", ".join(
            f"feed lag p99 {v['moderate_gateway_feed_lag_p99_ms']:g} ms, fan-out turn p99 "
            f"{v['moderate_gateway_turn_p99_ms']:g} ms ({channels(v)})" for v in own))
    return "; ".join(parts)


def connections(f: dict[str, Any]) -> list[Row]:
    cfg, t = f["config"], f["targets"]
    met, want = t["met_each"], t["wanted"]
    connect, storm, feed, mem = f.get("connect", {}), f.get("storm", {}), f.get("feed", {}), f.get("memory", {})
    lat, m, kern = feed.get("push_latency_ms", {}), f.get("model", {}), mem.get("kernel", {})
    read = feed.get("read_latency_ms", {})
    n = f"{cfg['connections']:,} connections, {cfg['workers']} gateway workers, {cfg['client_procs']} client processes"
    held = connect.get("subscribed") or 0
    rows = [row(f"`perf/bench_connections.py` (`connections.json`): {n}, held subscribed at once",
                f"{held:,} subscribed in {connect.get('seconds')} s", "", "",
                f">= {want['connections']:,}", met["connections"]),
            row(f"same, {cfg['rate_per_symbol']:g} depth updates/s on each of {cfg['symbols']} symbols: "
                "every update to every subscriber",
                f"{feed.get('delivered', 0):,} of {feed.get('expected_deliveries', 0):,} delivered, "
                f"{feed.get('lost_updates')} lost; p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
                f"p99.9 {lat.get('p99.9')} ms" + (f" to arrival (read by the clients: p99 {read['p99']} ms)"
                                                  if read.get("p99") is not None else ""),
                f"model (subscribers per process x {m.get('write_cost_us_raw_loop')} us a write): "
                f"{m.get('per_process_ms')} ms; cores shared: {m.get('shared_cores_ms')} ms",
                f"p99 {m.get('p99_over_per_process')}x / {m.get('p99_over_shared_cores')}x the model",
                "none lost", met["lost_updates"]),
            row("same, gateway memory per connection (RSS of every worker; kernel beside it)",
                f"{mem.get('gateway_kb_per_connection')} KB held; "
                f"{f.get('after_storm', {}).get('memory', {}).get('gateway_kb_per_connection')} KB after the storm",
                f"kernel: {kern.get('tcp_buffers_kb_per_connection')} KB buffers + "
                f"{kern.get('slab_kb_per_connection')} KB slab per connection (both ends)", "",
                f"<= {want['gateway_kb_per_connection']} KB", met["gateway_kb_per_connection"]),
            row("same, reconnect storm: every connection dropped at once, back to fully subscribed",
                f"{storm.get('seconds')} s, {storm.get('gateway_log', {}).get('errors')} gateway errors", "", "",
                f"<= {want['storm_s']:g} s, no gateway error", met["storm_s"] and met["gateway_errors"])]
    return rows


def soak(f: dict[str, Any]) -> list[Row]:
    cfg, v, rate = f["config"], f["verdicts"], f.get("rate", {})
    p, r, cap = v["p99_flat"], v["rss_flat"], f.get("capacity", {})
    load = (f"{cfg['connections']:,} connections x {cfg['channels']} channels, {cfg['workers']} gateway workers, "
            f"{cfg['minutes']:g} min at {rate.get('orders_per_s', 0):,.0f} orders/s "
            f"({rate.get('share_of_capacity') or 0:.2f} of the capacity)")
    baseline = f"capacity in the same run (burst): {cap.get('delivered_per_s') or 0:,} delivered/s"
    if "first_third_median_ms" in p:
        zmx = (f"p99 {p['first_third_median_ms']:g} ms (first third) -> {p['last_third_median_ms']:g} ms (last), "
               f"slope {p['slope_ms_per_min']:+.2f} ms/min")
        ratio = f"{p['ratio_last_to_first']:.2f}x"
    else:
        zmx, ratio = "no p99 over time", ""

    def rss(group: str, name: str | None = None) -> str:
        g, name = r.get(group, {}), name or group
        if "high_growth" not in g:
            return f"{name} -"
        return (f"{name} highs {g['high_growth'] * 100:+.1f}%, lows {g['low_growth'] * 100:+.1f}% "
                f"({g['high_last_kb'] / 1024:.1f} MB at most; means {g['growth'] * 100:+.1f}%)")

    what = "same, RSS of the last third vs before it: its highest vs the highest before, its lowest vs the " \
        "middle third's lowest"
    filters = r.get("matcher_id_filters", {})
    if "min_kb" in filters:  # the matcher judged less its order-id filters, which grow by design
        what += "; the matcher less its order-id filters"
        judged = ", ".join((rss("gateway"), rss("matcher_less_id_filters", "matcher less its order-id filters"),
                            rss("router")))
        judged += (f"; beside: the order-id filters {filters['min_kb'] / 1024:.1f} -> "
                   f"{filters['max_kb'] / 1024:.1f} MB (2 bytes an id), the matcher as measured "
                   f"{rss('matcher').removeprefix('matcher ')}")
    else:  # results from before the matcher logged its filters
        judged = ", ".join(rss(g) for g in ("gateway", "matcher", "router"))

    end = f.get("end", {})
    return [row(f"`perf/bench_soak.py` (`soak.json`): {load}; delivered messages' latency over time", zmx, baseline,
                ratio, "last third's median p99 <= 1.5x the first's, no upward trend", p["met"]),
            row(what, judged, "", "", "each within +5%", r["met"]),
            row("same, connections and counts at the end",
                f"{end.get('lost_connections')} lost, {end.get('uneven_channels')} channels with uneven counts", "",
                "", "none lost, equal counts per channel",
                bool(v["no_connection_lost"]["met"] and v["even_counts"]["met"]))]


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {"engine": engine, "orders": orders, "pub": pub,
                                                               "fanout": fanout, "hosts": hosts,
                                                               "connections": connections, "soak": soak}


def summarize(name: str, figures: dict[str, Any]) -> list[Row]:
    """The summary rows of benchmark ``name`` from its figures; a figure it cannot read gives a
    row that says so, rather than a benchmark that loses its results at the last step."""
    try:
        return SUMMARIES[name](figures)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        print(f"WARNING: no summary rows for {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return [row(f"`perf/bench_{name}.py` (`{name}.json`)", f"(no summary: {type(e).__name__}: {e})")]


def resummarize(path: Path) -> None:
    """Recompute the ``summary`` of a results file from its figures, in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("summary", None)
    rows = summarize(data["benchmark"], data)
    figures = {k: v for k, v in data.items() if k not in METADATA}
    meta = {k: v for k, v in data.items() if k in METADATA}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**figures, "summary": rows, **meta}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    for arg in argv:
        path = Path(arg)
        name = json.loads(path.read_text(encoding="utf-8")).get("benchmark", path.stem)
        if name in SUMMARIES:
            resummarize(path)
            print(f"{arg}: summary recomputed")
        else:
            print(f"{arg}: no summary function for {name!r} here; left as it is", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
