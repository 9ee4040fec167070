"""How the ingress picks a scorer replica for an answer: Serve's multiplexed routing, with a hot part spread.

Ray Serve sends a request with a multiplexed model id to the replicas that
already hold that model, and to another replica only once those are full
(``max_ongoing_requests``). With a scorer's many slots a busy part therefore
stays on one replica while another sits idle (ray-project/ray#48741; measured
here with one part and two replicas: 291 answers on one, none on the other).

:class:`PartAffinityRouter` keeps Serve's routing (replicas that hold the
part's adapter first, then those holding the fewest) until the replicas that
hold the part have ``spread_at`` more requests in flight than the least busy
replica; then the request goes to the least busy replicas, which load the
adapter and from then on hold the part too. It runs in each ingress replica,
the caller of the scorer deployment.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


class PartAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's power-of-two-choices routing with multiplexing; spreads a part whose replicas are ``spread_at`` busier.

    Built on Serve's public request-router API (``ray.serve.request_router``):
    the mixins give the candidates (replicas holding the part's model id, else
    those holding the fewest models; else the local ones), of which two are drawn
    and Serve sends the request to the less busy one that accepts it.
    """

    def initialize_state(self, spread_at: int = 4, **kwargs) -> None:
        self.spread_at = spread_at

    def in_flight(self, replica: RunningReplica) -> int:
        """Requests in flight on a replica as this router last knew it (0 when it has not asked lately)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if model_id and len(candidate_replicas) > 1:
            holders = [r for r in candidate_replicas if model_id in r.multiplexed_model_ids]
            least = min(self.in_flight(r) for r in candidate_replicas)
            if holders and min(self.in_flight(r) for r in holders) - least >= self.spread_at:
                pending_request.routing_context.should_backoff = True
                return [sorted(candidate_replicas, key=self.in_flight)[:2]]
        if model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        replicas = self.curr_replicas
        chosen = [replicas[i] for i in ids if i in replicas]
        return [random.sample(chosen, min(2, len(chosen)))] if chosen else []
