"""`python -m node.memory.indexer SHARD`: build a namespace's HNSW index in a process of its own.

Qdrant Edge's `optimize()` holds the GIL for its whole run (measured: 64 s for 100k memories on 2 cores, during
which no other Python thread ran), so run in the daemon it would freeze the API. The daemon closes the shard, this
child opens, optimizes and closes it, and the daemon opens it again (node.memory.edge.EdgeBackend.index).
"""

import os
import sys

from qdrant_edge import EdgeShard


def main(argv: list[str]) -> int:
    """Optimize the shard at argv[0]; exit 0 when done."""
    os.nice(10)
    shard = EdgeShard.load(argv[0])
    shard.optimize()
    shard.flush()
    shard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
