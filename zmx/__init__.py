"""zmx: a brokerless ZeroMQ exchange cluster.

The modules directly under ``zmx/`` are the pure core: no sockets, no asyncio, no files,
no clocks. The I/O shells live under ``zmx/node``.
"""

__version__ = "0.1.0"
