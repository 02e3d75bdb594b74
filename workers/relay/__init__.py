"""The relay: how serving processes (`--http-processes N`, N ≥ 2) hand their calls to the one
process that holds the executor, so every worker serves every serving process.

    client ─HTTP─▶ serving process 1 ─┐                       ┌─▶ worker
    client ─HTTP─▶ serving process 2 ─┼─ unix socket ─▶ core ─┼─▶ worker      (the one pool, the one
    client ─HTTP─▶ serving process N ─┘  (relay frames)       └─▶ worker       admission limit)

Each serving process parses HTTP, checks keys, validates arguments and writes responses on its own
loop; what crosses the relay per call is one message out (task, arguments, timeout) and one back
(the Outcome, or the PoolError), batched like the pool's own frames: every message one loop turn
produces leaves as one frame (workers/framing.py: length-prefixed pickle between our own processes;
nothing a client sends is ever unpickled, its JSON is decoded before it becomes a message).

- wire.py      the messages and `FrameLink`, an asyncio protocol that batches frames both ways
- executor.py  `RelayExecutor`: the Executor a serving process calls, forwarding over the relay
- server.py    `RelayServer`: the core's end, running each call on the core's handler
"""
