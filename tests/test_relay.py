"""The relay node, as a real process between publishers that the test owns and a SUB.

The test binds an XPUB at each matcher's ``pub`` endpoint of the topology (no matcher process
is needed): an XPUB sees the subscriptions that reach it, which is the proof that they travel
upstream through the relay -- and the moment from which a publication reaches the subscriber.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import zmq
from nodes import Cluster, dropped, free_ports, write_topology

from zmx.codec import encode_publication
from zmx.events import BookChanged
from zmx.node.runtime import load_topology
from zmx.topics import topic
from zmx.topology import Topology, connect_endpoint

TIMEOUT_MS = 10_000


def book(symbol: str, seq: int) -> bytes:
    return encode_publication(symbol, [BookChanged(symbol, seq, 1, ((100, seq),), ())])


def recv(sock: zmq.Socket, what: str) -> bytes:
    assert sock.poll(TIMEOUT_MS), f"nothing received: {what}"
    return sock.recv()


def upstream_publishers(ctx: zmq.Context, topology: Topology, verbose: bool = False) -> dict[str, zmq.Socket]:
    """An XPUB bound where each matcher would publish; ``verbose`` as a matcher's is (it hands
    over every subscription, a topic's later ones too)."""
    publishers = {}
    for node in topology.nodes_by_role("matcher"):
        xpub = ctx.socket(zmq.XPUB)
        xpub.linger = 0
        xpub.setsockopt(zmq.XPUB_VERBOSE, int(verbose))
        xpub.bind(node.pub)  # type: ignore[union-attr]
        publishers[node.name] = xpub
    return publishers


def subscriber(ctx: zmq.Context, endpoint: str, symbol: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(endpoint)
    sub.subscribe(topic(symbol))
    return sub


def test_subscriptions_travel_upstream_and_only_subscribed_topics_arrive(
        cluster: Cluster, tmp_path: Path, context: zmq.Context) -> None:
    cluster.topology = write_topology(tmp_path, relay=True)
    topology = load_topology(cluster.topology)
    m1, m2 = upstream_publishers(context, topology).values()
    relay = cluster.start("x1")
    ready = relay.ready
    relay_pub = topology.nodes["x1"].pub  # type: ignore[union-attr]
    assert ready is not None and ready["role"] == "relay"
    assert ready["pub"] == relay_pub

    sub = subscriber(context, connect_endpoint(relay_pub), "BTC-USDT")

    # The subscription reaches every upstream matcher, and it is the only one: the relay
    # receives what its subscribers hold, not everything.
    assert recv(m1, "BTC-USDT subscription at m1") == b"\x01" + topic("BTC-USDT")
    assert recv(m2, "BTC-USDT subscription at m2") == b"\x01" + topic("BTC-USDT")

    # XPUBs drop what nobody subscribed; a message that slipped through would arrive before
    # the last BTC-USDT one, which travels the same path.
    m1.send(book("SOL-USDT", 1))
    m1.send(book("BTC-USDTX", 1))
    m1.send(book("BTC-USDT", 1))
    m1.send(book("BTC-USDT", 2))
    assert recv(sub, "BTC-USDT 1") == book("BTC-USDT", 1)
    assert recv(sub, "BTC-USDT 2") == book("BTC-USDT", 2)

    # A second topic, from the other matcher: subscribed (at every upstream), then published.
    sub.subscribe(topic("ETH-USDT"))
    assert recv(m1, "ETH-USDT subscription at m1") == b"\x01" + topic("ETH-USDT")
    assert recv(m2, "ETH-USDT subscription at m2") == b"\x01" + topic("ETH-USDT")
    m2.send(book("ETH-USDT", 7))
    assert recv(sub, "ETH-USDT 7") == book("ETH-USDT", 7)

    # Unsubscribing travels upstream too.
    sub.unsubscribe(topic("BTC-USDT"))
    assert recv(m1, "BTC-USDT unsubscription at m1") == b"\x00" + topic("BTC-USDT")

    # SIGTERM stops the proxy cleanly.
    sub.close()
    assert relay.stop() == 0
    assert "stopped" in relay.log()


def test_every_subscribers_subscription_goes_upstream_and_the_last_ones_unsubscription(
        cluster: Cluster, tmp_path: Path, context: zmq.Context) -> None:
    # So that the matcher can answer each one with the symbol's heartbeat (the proof a gateway
    # waits for before it asks for a snapshot), and the topic still leaves the matcher's feed
    # when the relay's last subscriber of it goes.
    cluster.topology = write_topology(tmp_path, matchers={"m1": ["BTC-USDT"]}, relay=True)
    topology = load_topology(cluster.topology)
    (m1,) = upstream_publishers(context, topology, verbose=True).values()
    cluster.start("x1")
    endpoint = connect_endpoint(topology.nodes["x1"].pub)  # type: ignore[union-attr]
    subs = []
    for i in range(3):
        subs.append(subscriber(context, endpoint, "BTC-USDT"))
        assert recv(m1, f"subscriber {i}'s subscription") == b"\x01" + topic("BTC-USDT")
    # The first two leave: no unsubscription goes upstream (each one's next subscription, on
    # the same connection, comes after its unsubscription would have).
    for sub, marker in zip(subs, ("ETH-USDT", "SOL-USDT")):
        sub.unsubscribe(topic("BTC-USDT"))
        sub.subscribe(topic(marker))
        assert recv(m1, f"{marker} subscription") == b"\x01" + topic(marker)
    # The last one leaves: the topic is unsubscribed upstream.
    subs[2].unsubscribe(topic("BTC-USDT"))
    assert recv(m1, "the unsubscription") == b"\x00" + topic("BTC-USDT")
    for sub in subs:
        sub.close()


def test_a_relay_fans_out_to_several_subscribers(cluster: Cluster, tmp_path: Path, context: zmq.Context) -> None:
    cluster.topology = write_topology(tmp_path, matchers={"m1": ["BTC-USDT"]}, relay=True)
    topology = load_topology(cluster.topology)
    (m1,) = upstream_publishers(context, topology).values()
    cluster.start("x1")
    endpoint = connect_endpoint(topology.nodes["x1"].pub)  # type: ignore[union-attr]
    subs = [subscriber(context, endpoint, "BTC-USDT") for _ in range(3)]
    # This XPUB (not verbose, unlike a matcher's) passes on a topic's first subscription only,
    # so it only proves the relay holds at least one subscriber: send until
    # each subscriber has its first message (a subscriber that joins late misses the first).
    seen = [False] * len(subs)
    poller = zmq.Poller()
    for sub in subs:
        poller.register(sub, zmq.POLLIN)
    seq = 0
    while not all(seen):
        seq += 1
        assert seq < 10_000, "a subscriber never got a message"
        m1.send(book("BTC-USDT", seq))
        for sock, _ in poller.poll(10):
            sock.recv()
            seen[subs.index(sock)] = True
    m1.send(book("BTC-USDT", seq + 1))
    for i, sub in enumerate(subs):
        while recv(sub, f"subscriber {i}") != book("BTC-USDT", seq + 1):
            pass  # the earlier ones of the warm-up


class Blackhole:
    """A TCP forwarder from 127.0.0.1:``port`` to ``upstream`` (each new connection goes where
    ``upstream`` says at the time), whose ``cut`` makes the connections it carries go silent
    both ways without closing (what a link that fails, or a host that dies without a TCP reset,
    leaves: half-open connections); new ones go through."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", port))
        self.cut_off: list[socket.socket] = []  # silenced, never closed until the end
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                near.close()
                continue
            with self.lock:
                self.live += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                return
            with self.lock:
                if a in self.cut_off:
                    return  # silent: nothing forwarded, nothing closed, nothing read any more
            if not data:
                with self.lock:
                    if a in self.cut_off:
                        return
                b.close()
                return
            try:
                b.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        with self.lock:
            self.cut_off += self.live
            self.live = []

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        with self.lock:
            for sock in self.cut_off + self.live:
                sock.close()


def test_a_relay_drops_an_upstream_connection_that_went_silent_and_reaches_the_restarted_matcher(
        cluster: Cluster, tmp_path: Path, context: zmq.Context) -> None:
    """A review cut a relay off its matcher, killed and restarted the matcher during the cut
    (its FIN lost), and healed: the relay kept the dead connection (an XSUB with nothing to
    subscribe never writes, so it never learns), and the gateways behind it showed a frozen
    book until their clients left. Its pings now drop such a connection, and it connects again."""
    cluster.topology = write_topology(tmp_path, matchers={"m1": ["BTC-USDT"]}, relay=True)
    topology = load_topology(cluster.topology)
    _, port = connect_endpoint(topology.nodes["m1"].pub)[len("tcp://"):].rsplit(":", 1)  # type: ignore[union-attr]

    def publisher(at: int) -> zmq.Socket:  # the matcher, at a port of its own behind the forwarder
        xpub = context.socket(zmq.XPUB)
        xpub.linger = 0
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        xpub.bind(f"tcp://127.0.0.1:{at}")
        return xpub

    first, second = free_ports(2)
    link = Blackhole(int(port), ("127.0.0.1", first))
    try:
        m1 = publisher(first)
        cluster.start("x1")
        sub = subscriber(context, connect_endpoint(topology.nodes["x1"].pub), "BTC-USDT")  # type: ignore[union-attr]
        assert recv(m1, "the subscription") == b"\x01" + topic("BTC-USDT")
        m1.send(book("BTC-USDT", 1))
        assert recv(sub, "the first publication") == book("BTC-USDT", 1)

        link.cut()  # the link fails...
        m1.close()  # ... and the matcher dies, its goodbye lost with the link
        m1 = publisher(second)  # restarted; new connections go through again, to it
        link.upstream = ("127.0.0.1", second)
        # The relay connects to it again once its pings found the old connection dead (about
        # 4 s), and its subscriber's subscription comes with it.
        assert m1.poll(15_000), "the relay never connected to the restarted matcher"
        assert m1.recv() == b"\x01" + topic("BTC-USDT")
        m1.send(book("BTC-USDT", 2))
        assert recv(sub, "a publication of the restarted matcher") == book("BTC-USDT", 2)
        sub.close()
        m1.close()
    finally:
        link.close()


def test_a_subscription_longer_than_any_topic_drops_its_sender_and_the_relay_keeps_serving(
        cluster: Cluster, tmp_path: Path, context: zmq.Context) -> None:
    """A subscription of 100 KiB (no topic is over 128 bytes) is refused: the relay drops the
    connection that sent it (ZMQ_MAXMSGSIZE), nothing of it goes upstream, and a subscriber that
    comes next is served. (Taken in, such a subscription cost the relay a deep trie: it crashed,
    or, at 30 MiB, spun with 4.5 GB and forwarded nothing.)"""
    cluster.topology = write_topology(tmp_path, relay=True)
    topology = load_topology(cluster.topology)
    m1, _ = upstream_publishers(context, topology).values()
    relay = cluster.start("x1")
    relay_pub = connect_endpoint(topology.nodes["x1"].pub)  # type: ignore[union-attr]
    bad = context.socket(zmq.XSUB)
    bad.linger = 0
    with dropped(bad, "the sender of a 100 KiB subscription"):
        bad.connect(relay_pub)
        bad.send(b"\x01" + b"A" * 100_000)
    sub = subscriber(context, relay_pub, "BTC-USDT")
    assert recv(m1, "the next subscriber's subscription") == b"\x01" + topic("BTC-USDT")
    m1.send(book("BTC-USDT", 1))
    assert recv(sub, "BTC-USDT 1") == book("BTC-USDT", 1)
    assert relay.proc.poll() is None
    bad.close(0)
