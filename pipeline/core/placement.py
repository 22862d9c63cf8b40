"""Where work ran: the Ray node id and hostname of each worker, recorded in the manifests
so that a node that misbehaves can be found (which shards it scored, which rank it held)."""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from typing import Iterable


def here() -> dict:
    """This process's node: the Ray node id (None outside Ray) and the hostname."""
    node_id = None
    ray = sys.modules.get("ray")  # never imported here: a run without Ray stays without it
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid()}


def by_node(entries: Iterable[dict], what: str) -> list[dict]:
    """[{node_id, hostname, <what>: count}] from one entry per unit of work, busiest first."""
    counts = Counter((e["node_id"], e["hostname"]) for e in entries)
    return [{"node_id": node, "hostname": host, what: n}
            for (node, host), n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0][0])))]
