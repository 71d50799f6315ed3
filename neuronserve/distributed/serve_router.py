"""``routing``'s policies as a Ray Serve request router (``RequestRouterConfig``).

Ray Serve calls ``choose_replicas`` in the caller's process (the gateway) for every request to the
engine replicas. The gateway passes the prompt's prefix block hashes as the ``prefix_hashes``
keyword; loads are Ray's own per-replica count of requests in flight from this caller (updated on
every send and completion, refreshed by probes). The chosen replica is the first rank; every other
replica is the second, so a chosen replica that refuses (at ``max_ongoing_requests``) or has just
died never stalls a request: Ray takes the least loaded of the rest.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from neuronserve.distributed.routing import PrefixAwarePolicy, make_policy


class NeuronserveRouter(RequestRouter):
    """Prefix-aware (default), round-robin or least-outstanding routing of engine requests."""

    def initialize_state(self, routing: str = "prefix", load_factor: float = 1.25, **_) -> None:
        kwargs = {"load_factor": load_factor} if routing == "prefix" else {}
        self.policy = make_policy(routing, **kwargs)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self.replica_queue_len_cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        hashes = (pending_request.kwargs.get("prefix_hashes") if pending_request else None) or []
        chosen = self.policy.choose(sorted(by_id), loads, hashes)
        return [[by_id[chosen]], [r for rid, r in by_id.items() if rid != chosen]]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        if isinstance(self.policy, PrefixAwarePolicy):
            self.policy.forget(replica_id.unique_id)
