"""Session affinity for model deployments: a decode session's calls go to the replica holding its KV cache.

Calls that carry a session id (`handle.options(session_id=…)`) rank the replicas by rendezvous
hashing of (session id, replica id): the same replica while it lives, and when replicas come or go
only the sessions of the replica that left move. Other calls pick the less loaded of two random
replicas. Affinity is a speed-up only: a call that lands elsewhere gets `SessionNotFound` and the
client replays the session (handle_backend.py).
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def rendezvous_rank(key: str, replica_ids: list[str]) -> list[int]:
    """Indices of `replica_ids` by decreasing hash(key, id) (highest random weight first)."""
    weights = [hashlib.blake2b(f"{key}\x00{r}".encode(), digest_size=8).digest() for r in replica_ids]
    return sorted(range(len(replica_ids)), key=lambda i: weights[i], reverse=True)


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = rendezvous_rank(key, [r.replica_id.unique_id for r in candidate_replicas])
        return [[candidate_replicas[i]] for i in order]
