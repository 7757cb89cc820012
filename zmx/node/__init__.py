"""The I/O shells around the pure core: one module per node role, plus the runtime
(reading files, starting and stopping processes)."""
