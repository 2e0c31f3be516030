"""What one node's KME answers, without I/O: who is calling, where the keys live, the
Status body, and which store refusal becomes which status code (the key container is
``api.etsi``'s).

The Sanic handlers (``api.server``) are a thin shell: they take the caller's certificate
CN, the path and the query or body, ask the global key manager, and hand what came back
to this module. Tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from api.etsi import ApiError, EncKeysRequest, Limits, bad
from control.core.config import Topology
from dataplane.limits import MAX_API_REQUEST_BYTES


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message)


@dataclass(frozen=True)
class Kme:
    """One node's view of the network: its SAEs and everyone else's."""

    node: str
    sae_nodes: dict[str, str]   # SAE ID -> node it is attached to
    limits: Limits
    max_key_count_bytes: int    # ENC store's high watermark, per peer

    @classmethod
    def from_topology(cls, topo: Topology, node: str) -> Kme:
        a = topo.api
        limits = Limits(key_size=a.key_size, min_key_size=8, max_key_size=a.max_key_size,
                        max_key_per_request=a.max_key_per_request,
                        max_sae_id_count=a.max_sae_id_count)
        return cls(node=topo.node(node).name, sae_nodes={s.id: s.node for s in topo.saes},
                   limits=limits, max_key_count_bytes=topo.gkm.high_watermark)

    # ---- who ----------------------------------------------------------------------------

    @property
    def own_saes(self) -> frozenset[str]:
        """The SAEs attached to this node: the only callers :meth:`caller` lets through."""
        return frozenset(s for s, n in self.sae_nodes.items() if n == self.node)

    def caller(self, cn: str | None) -> str:
        """The calling SAE from its verified client certificate's subject CN."""
        if cn is None:
            raise unauthorized("a client certificate is required (mutual TLS); its "
                               "subject CN is the SAE ID")
        node = self.sae_nodes.get(cn)
        if node is None:
            raise unauthorized(f"certificate CN {cn[:64]!r} is not an SAE of this network")
        if node != self.node:
            raise unauthorized(f"SAE {cn} is attached to node {node}: call that node's KME")
        return cn

    def _remote(self, sae: str, role: str) -> str:
        node = self.sae_nodes.get(sae)
        if node is None:
            raise bad(f"{role} SAE {sae!r} is not known in this network")
        if node == self.node:
            raise bad(f"{role} SAE {sae} is attached to this node too; keys are kept "
                      f"between different nodes only")
        return node

    def slave_node(self, slave: str, additional: Iterable[str] = ()) -> str:
        """The node whose DEC store will hold keys for ``slave`` (and the additional
        slaves, who must be attached to the same node)."""
        node = self._remote(slave, "slave")
        for extra in additional:
            if extra == slave:
                raise bad(f"slave SAE {slave} is named in additional_slave_SAE_IDs too")
            other = self._remote(extra, "additional slave")
            if other != node:
                raise bad(f"additional slave SAE {extra} is attached to node {other}, not "
                          f"to {node} with {slave}: keys are shared with one node")
        return node

    def master_node(self, master: str) -> str:
        return self._remote(master, "master")

    # ---- what ---------------------------------------------------------------------------

    def check_enc(self, req: EncKeysRequest) -> None:
        total = req.number * req.size_bytes
        if total > MAX_API_REQUEST_BYTES:
            raise bad(f"number x size is {total} bytes of key, above the "
                      f"{MAX_API_REQUEST_BYTES >> 20} MiB one answer may carry")

    def status(self, master: str, slave: str, slave_node: str, usable_bytes: int) -> dict:
        """The Status body; ``slave_node`` is ``slave_node(slave)``, found by the caller
        to ask that node's store for ``usable_bytes``."""
        lim = self.limits
        key_bytes = lim.key_size // 8
        return {
            "source_KME_ID": self.node,
            "target_KME_ID": slave_node,
            "master_SAE_ID": master,
            "slave_SAE_ID": slave,
            "key_size": lim.key_size,
            "stored_key_count": usable_bytes // key_bytes,
            "max_key_count": self.max_key_count_bytes // key_bytes,
            "max_key_per_request": lim.max_key_per_request,
            "max_key_size": lim.max_key_size,
            "min_key_size": lim.min_key_size,
            "max_SAE_ID_count": self.max_sae_id_count(slave),
        }

    def max_sae_id_count(self, slave: str) -> int:
        """How many additional_slave_SAE_IDs a request for ``slave`` can name and have
        served: the configured count, but no more than the other SAEs attached to the
        slave's node (each additional slave fetches from that node's KME)."""
        node = self.sae_nodes.get(slave)
        others = sum(1 for s, n in self.sae_nodes.items() if n == node and s != slave)
        return min(self.limits.max_sae_id_count, others)


# The global key manager's refusals (StoreError kinds), as the standard's status codes.
_STORE_STATUS = {"short": 503, "busy": 503, "unreachable": 503, "bad": 400,
                 "forbidden": 401}


def store_refusal(kind: str, message: str, on_dec: bool) -> ApiError:
    """``unknown`` is a key the KME does not have (400, the standard's message) on
    dec_keys, and a pair that keeps no global key (503: the KME cannot serve) on
    enc_keys and status."""
    if kind == "unknown":
        if on_dec:
            return ApiError(400, "one or more keys specified are not found on KME",
                            [{"reason": message}])
        return ApiError(503, f"no global key is kept for this pair of nodes: {message}")
    if kind == "short":
        return ApiError(503, f"not enough key material; nothing was taken ({message})")
    return ApiError(_STORE_STATUS.get(kind, 503), message)
