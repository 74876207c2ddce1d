"""The ZeroMQ transport between clients and worker supervisors.

Broker-less and credit-based: a worker tells each client how many tasks of
each queue it can take (credit), and a client sends a queue's tasks only to
workers that gave it credit for that queue. So a busy worker is never handed
more than its prefetch window, and several workers share one client's load by
how fast each one frees capacity, not by a blind round-robin (ZeroMQ's PUSH
fan-out alone let kernel buffers hand one slow worker most of a batch).
See :mod:`engine.transport.protocol` for the frames.
"""
