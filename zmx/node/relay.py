"""The relay node: an XSUB/XPUB proxy, a fan-out tier between matchers and gateways.

Its XSUB connects to the PUB of every upstream matcher (``RelayNode.upstream``), its XPUB is
bound at ``pub``. ZeroMQ forwards the subscriptions of the relay's subscribers upstream (each
one: ``XPUB_VERBOSE``), so a relay only receives the topics that somebody downstream holds,
and filtering happens at the matcher. Frames pass through untouched (one frame per
publication, see docs/wire.md).

The proxy itself runs in C (``zmq.proxy_steerable``) in a thread; the main thread waits on the
``Stopper`` and, when SIGINT or SIGTERM sets it, sends ``TERMINATE`` on the proxy's control
socket. The proxy returns, the thread ends, and the sockets are closed with ``linger=0``.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from zmx.node.runtime import POLL_MS, Stopper, announce_ready, bind, cannot_bind, connect, watch_peer
from zmx.topics import SUBSCRIPTION_MAX_BYTES
from zmx.topology import RelayNode, Topology

log = logging.getLogger("zmx.relay")

# Subscribers that fall behind drop messages at this many queued frames; the matchers' own PUB
# sockets keep the same default. The bound is a count, not bytes (ZeroMQ has no other): with
# publications of a few hundred bytes, as most of the cluster's are, a stalled subscriber holds
# tens of MB of the relay's memory; big ones (a sweep of a deep book, or a review's made-up
# matcher publishing megabyte frames: hundreds of MB) hold more (docs/operations.md).
HWM = 100_000


def run(topology: Topology, name: str, stopper: Stopper) -> None:
    """Serve relay ``name`` of ``topology`` until ``stopper`` is set."""
    node = topology.node(name)
    if not isinstance(node, RelayNode):
        raise TypeError(f"node {name!r} is a {node.role}, not a relay")
    upstream = topology.upstream_endpoints(name)
    context = zmq.Context()
    control_address = f"inproc://relay-{name}-control"
    xsub = context.socket(zmq.XSUB)
    xpub = context.socket(zmq.XPUB)
    control_in = context.socket(zmq.PAIR)
    control_out = context.socket(zmq.PAIR)
    try:
        for sock in (xsub, xpub, control_in, control_out):
            sock.linger = 0
        xsub.rcvhwm = HWM
        xpub.sndhwm = HWM
        # Every subscriber's subscription goes upstream, not only a topic's first, so that the
        # matcher answers each one with the symbol's heartbeat (matcher.welcome), and every
        # unsubscription too: XSUB counts a topic's subscriptions and passes its
        # unsubscription on when the count is back to zero, so the two must come in pairs.
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        xpub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES)  # before bind: see zmx.topics
        control_in.bind(control_address)
        control_out.connect(control_address)
        # A matcher that restarted while cut off, or whose host is gone, would otherwise keep a
        # dead connection here for good: an XSUB that has no subscription to send never writes
        watch_peer(xsub)
        for endpoint in upstream:
            connect(xsub, endpoint)
        try:
            bind(xpub, node.pub)
        except zmq.ZMQError as e:
            log.error("%s", cannot_bind("the pub socket", node.pub, e.errno, e.strerror))
            raise SystemExit(1) from None
        # The proxy thread owns xsub, xpub and control_in from here on (a thread start is a
        # full memory barrier, which is what ZeroMQ asks of a socket that changes threads).
        proxy = threading.Thread(target=_proxy, args=(xsub, xpub, control_in, name),
                                 name=f"relay-{name}", daemon=True)
        proxy.start()
        log.info("relaying %s -> %s", ", ".join(upstream), node.pub)
        announce_ready(name, "relay", pub=node.pub, upstream=list(upstream))
        while not stopper.stopped and proxy.is_alive():
            time.sleep(POLL_MS / 1000)
        control_out.send(b"TERMINATE")
        proxy.join(timeout=5)
        if proxy.is_alive():
            log.error("the proxy did not stop within 5 s")
        else:
            log.info("stopped")
    finally:
        for sock in (control_out, control_in, xpub, xsub):
            sock.close(linger=0)
        context.term()


def _proxy(xsub: zmq.Socket, xpub: zmq.Socket, control: zmq.Socket, name: str) -> None:
    try:
        # frontend = XSUB (publications in), backend = XPUB (subscriptions in); the proxy
        # moves each direction across.
        zmq.proxy_steerable(xsub, xpub, None, control)
    except zmq.ContextTerminated:
        pass
    except zmq.ZMQError:
        log.exception("proxy of relay %s failed", name)
