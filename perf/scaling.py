"""The arithmetic of perf/SCALING.md, from the latest results files.

    .venv/bin/python perf/scaling.py          # prints the inputs (with their source) and the plan
    .venv/bin/python perf/scaling.py --write  # and puts both tables into perf/SCALING.md

Every input names the results file and the field it comes from; every derived figure says
how it is computed. SCALING.md explains the model; this script keeps its numbers honest
when the results change.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# the source design's targets (../shared/DESIGN.md, "Seed targets")
CONNECTIONS = 10_000_000
PUSHES_PER_S = 10_000_000
P99_MS = 5.0
NODE_RAM_GB = 32
CPU_SHARE = 0.70
NODE_CORES = 64  # the node we plan with: a common 2-socket server


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def inputs() -> list[tuple[str, float, str, str]]:
    """(name, value, unit, source)."""
    fanout = load("fanout")
    connections = load("connections")
    pub = load("pub")
    hosts = load("hosts")
    out: list[tuple[str, float, str, str]] = []

    write_us = connections["write_cost"]["cpu_us_per_write"]["median"]
    out.append(("w: CPU of one socket write (raw uvloop loop)", write_us, "us",
                "connections.json write_cost.cpu_us_per_write.median"))
    moderate = [c["gateway"]["moderate"]["server_cpu_s_per_million"] for c in fanout["cells"]
                if c.get("gateway", {}).get("moderate")]
    out.append(("g1: gateway CPU per delivered message, one message per write (moderate rate)", median(moderate),
                "us", "fanout.json cells[*].gateway.moderate.server_cpu_s_per_million, median"))
    burst = [c["gateway"]["max"]["server_cpu_s_per_million"] for c in fanout["cells"]
             if c.get("gateway", {}).get("max")]
    out.append(("gc: gateway CPU per delivered message, coalesced (burst)", median(burst), "us",
                "fanout.json cells[*].gateway.max.server_cpu_s_per_million, median"))
    memory = connections["memory"]
    out.append(("m_user: gateway RSS per held subscribed connection (100k held)",
                memory["gateway_kb_per_connection"], "KB", "connections.json memory.gateway_kb_per_connection"))
    out.append(("m_kernel: kernel slab per connection, both ends on this box",
                memory["kernel"]["slab_kb_per_connection"], "KB",
                "connections.json memory.kernel.slab_kb_per_connection"))
    out.append(("m_kernel/2: kernel slab per socket (the gateway's end only)",
                memory["kernel"]["slab_kb_per_socket"], "KB", "connections.json memory.kernel.slab_kb_per_socket"))
    connect = connections["connect"]
    out.append(("connect: gateway CPU per new connection (handshake + subscribe)",
                connect["gateway_cpu_us_per_connection"],
                "us", "connections.json connect.gateway_cpu_us_per_connection"))
    idle = connections["idle"]["cpu_cores"]["gateway"] / connect["subscribed"] * 1e6
    out.append(("idle: gateway CPU per idle connection (pings every 20 s, heartbeats every 5 s)", idle, "us/s",
                "connections.json idle.cpu_cores.gateway / connect.subscribed"))
    pubs = [v["zmx"]["publications_per_s"] for v in pub["symbol_counts"].values()]
    out.append(("p: publications/s one matcher sends (order path bound)", median(pubs), "/s",
                "pub.json symbol_counts[*].zmx.publications_per_s, median"))
    feed = [v["zmx_half_rate"]["latency_us"]["p50"] / 1000 for v in pub["symbol_counts"].values()]
    out.append(("f: the matcher's feed, command to a subscriber, p50 at half rate", median(feed), "ms",
                "pub.json symbol_counts[*].zmx_half_rate.latency_us.p50, median"))
    probe = [v["probe_ceiling"]["publications_per_s"] for v in pub["symbol_counts"].values()]
    out.append(("s: publications/s one Python SUB takes (probe ceiling)", median(probe), "/s",
                "pub.json symbol_counts[*].probe_ceiling.publications_per_s, median"))
    io = hosts["claims"]["2_matcher_cost_by_relays"]["matcher_io_thread_us_per_published"]["by_direct_subscribers"]
    first, last = min(io, key=int), max(io, key=int)
    per_sub = (io[last] - io[first]) / (int(last) - int(first))
    out.append(("d: matcher I/O-thread CPU per publication per extra direct subscriber", per_sub, "us",
                "hosts.json claims.2_matcher_cost_by_relays.matcher_io_thread_us_per_published.by_direct_subscribers"))
    flat = hosts["claims"]["1_gateway_cpu_flat"]
    out.append(("gateway CPU per delivered message, largest / one-gateway figure over 1-4 gateways",
                flat["ratio_max_to_first"], "x", "hosts.json claims.1_gateway_cpu_flat.ratio_max_to_first"))
    return out


def plan(values: dict[str, float]) -> list[tuple[str, str]]:
    w = values["w"]
    g1 = values["g1"]
    m_user = values["m_user"]
    m_kernel = values["m_kernel/2"]
    rows: list[tuple[str, str]] = []
    # 1. CPU for the pushes: one push per connection per second on average, so no coalescing.
    push_cores = PUSHES_PER_S * g1 / 1e6 / CPU_SHARE
    rows.append(("cores for 10M pushes/s at g1 (no coalescing) and 70% CPU",
                 f"{PUSHES_PER_S:,} x {g1:.1f} us / 0.7 = {push_cores:,.0f} cores"))
    # 2. latency: one message of a channel is written to every subscriber on a core in turn.
    feed_ms = values["f"]  # matcher -> (relays ->) gateway: what is left of P99 is the gateway's
    per_core = (P99_MS - feed_ms) * 1000 / w
    rows.append(("subscribers of one message a core can write within the P99 budget",
                 f"({P99_MS:g} - {feed_ms:.2f} ms feed) / {w:.1f} us = {per_core:,.0f}"))
    hot_cores = CONNECTIONS / per_core
    rows.append(("cores so that a message every connection holds (one hot channel) meets P99",
                 f"{CONNECTIONS:,} / {per_core:,.0f} = {hot_cores:,.0f} cores"))
    cores = max(push_cores, hot_cores)
    nodes = math.ceil(cores / NODE_CORES)
    rows.append((f"nodes of {NODE_CORES} cores",
                 f"max({push_cores:,.0f}, {hot_cores:,.0f}) / {NODE_CORES} = {nodes:,}"))
    per_node = CONNECTIONS / nodes
    mem_gb = per_node * (m_user + m_kernel) / 1e6
    rows.append(("connections per node; memory per node (user + kernel)",
                 f"{per_node:,.0f}; {per_node:,.0f} x ({m_user:.2f} + {m_kernel:.2f}) KB = {mem_gb:.2f} GB "
                 f"(limit {NODE_RAM_GB} GB)"))
    one_node = CONNECTIONS * (m_user + m_kernel) / 1e6
    rows.append(("memory of 10M connections on one node (what 32 GB buys)",
                 f"{CONNECTIONS:,} x {m_user + m_kernel:.2f} KB = {one_node:.1f} GB; a hot message there reaches "
                 f"everyone after {CONNECTIONS * w / 1e6 / NODE_CORES:,.2f} s over {NODE_CORES} cores"))
    even = CONNECTIONS / 10 / per_core
    rows.append(("cores if the connections held 10 equally busy channels whose messages never coincide",
                 f"{CONNECTIONS:,} / 10 / {per_core:,.0f} = {even:,.0f} cores (a lower bound, not the plan)"))
    fan_out = 16
    layers, n = [], nodes
    while n > fan_out:
        n = math.ceil(n / fan_out)
        layers.append(n)
    rows.append((f"relay tiers at a fan-out of {fan_out} (one relay per node feeds its gateway processes)",
                 f"{len(layers)} tier(s) of {' and '.join(f'{x:,}' for x in reversed(layers)) or 'no'} relays between "
                 f"the matcher and the {nodes:,} node relays; the matcher has {n} direct subscriber(s)"))
    idle = values["idle"] * per_node / 1e6
    rows.append(("cores per node for idle connections (pings, heartbeats)",
                 f"{per_node:,.0f} x {values['idle']:.2f} us/s = {idle:.2f} cores"))
    storm = values["connect"] * per_node / 1e6 / NODE_CORES
    rows.append(("a whole node's clients reconnecting at once",
                 f"{per_node:,.0f} x {values['connect']:.0f} us / {NODE_CORES} cores = {storm:.2f} s of CPU"))
    return rows


def tables() -> tuple[str, str]:
    values: dict[str, float] = {}
    lines = ["| input | value | source |", "|---|---:|---|"]
    for name, value, unit, source in inputs():
        values[name.split(":")[0]] = value
        lines.append(f"| {name} | {value:,.2f} {unit} | `{source}` |")
    plan_lines = ["| plan | arithmetic |", "|---|---|"]
    plan_lines += [f"| {name} | {arithmetic} |" for name, arithmetic in plan(values)]
    return "\n".join(lines), "\n".join(plan_lines)


def main(argv: list[str]) -> int:
    inputs_table, plan_table = tables()
    if "--write" not in argv:
        print(inputs_table + "\n\n" + plan_table)
        return 0
    path = Path(__file__).resolve().parent / "SCALING.md"
    text = path.read_text(encoding="utf-8")
    for marker, table in (("inputs", inputs_table), ("plan", plan_table)):
        start, end = f"<!-- scaling:{marker}:start -->", f"<!-- scaling:{marker}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{table}\n{end}{tail}"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
