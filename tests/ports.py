"""Free loopback ports for the servers tests and benchmarks start: the one helper (tests import it through conftest).

No pytest or project imports, so a benchmark can use it too (with tests/ appended to its import path).
"""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free a moment ago (all bound at once, so none repeats), on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One port that was free a moment ago, on 127.0.0.1."""
    return free_ports(1)[0]
