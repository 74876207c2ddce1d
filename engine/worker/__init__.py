"""The worker: a supervisor process, its prefork children, and how tasks reach them.

- :mod:`~engine.worker.supervisor` — the main loop: transport, timers, dispatch, states.
- :mod:`~engine.worker.pool` — forking, watching and replacing children.
- :mod:`~engine.worker.child` — the loop each child runs.
- :mod:`~engine.worker.scheduler` — FIFO and fair dispatch.
- :mod:`~engine.worker.pipe` — the framed pipes between supervisor and children.
"""
