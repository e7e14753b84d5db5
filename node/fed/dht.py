"""Federation descriptors in the Kademlia DHT, under /mirador-fed/<37 hex digits> (`descriptor_key(name, creator)`).

Every DHT node validates a descriptor before storing it (`DescriptorValidator`, registered for the 'mirador-fed'
namespace next to the registry's 'mirador' one): it must verify under its own key, signed by its creator, and a key
that already holds a descriptor accepts only the same bytes again. Descriptors are immutable: a creator who signs
another descriptor under the same name cannot replace the one the network holds.

As in node.market.registry_dht, py-libp2p 0.8.1 answers `get_value` from the local store alone when it holds anything,
so `DhtFederations.fetch` asks the closest peers itself (`value_store._get_from_peer`, pinned version) and verifies
every answer.
"""

import logging

from libp2p.kad_dht.kad_dht import KadDHT

from federation.descriptor import DescriptorError, FederationDescriptor, descriptor_key, verify_descriptor
from node.market.registry_dht import StoredValueValidator, dht_values

FED_NAMESPACE = "mirador-fed"
log = logging.getLogger(__name__)


class DescriptorConflict(ValueError):
    """Another descriptor is already stored under that key (descriptors are immutable)."""


class DescriptorValidator(StoredValueValidator):
    """The DHT's check of /mirador-fed/ values: a verified descriptor under its own key, never replacing another."""

    def validate(self, key: str, value: bytes) -> None:
        """Raise DescriptorError or DescriptorConflict unless `value` may be stored under `key`."""
        old = self._stored(key)
        if old is not None and old != value:
            raise DescriptorConflict(f"{key} already holds another descriptor; descriptors are immutable")
        verify_descriptor(value, key)

    def select(self, key: str, values: list[bytes]) -> int:
        """The first valid descriptor (0 if none is valid, which keeps the stored one).

        Copies of it that follow are the same descriptor, and the last of them is chosen: a republished descriptor
        then replaces its stored copy, which refreshes the record's expiry at the peers that hold it.
        """
        for first, value in enumerate(values):
            if _valid(key, value):
                same = [i for i in range(first, len(values)) if values[i] == value]
                return same[-1]
        return 0


def federation_validators() -> dict[str, DescriptorValidator]:
    """The validators a node's DHT needs for federations ({namespace: validator}); bind them to the DHT once built."""
    return {FED_NAMESPACE: DescriptorValidator()}


def _valid(key: str, value: bytes) -> bool:
    """True if `value` is a descriptor that verifies under `key`."""
    try:
        verify_descriptor(value, key)
    except DescriptorError:
        return False
    return True


class DhtFederations:
    """Publish and fetch federation descriptors through a running node's DHT."""

    def __init__(self, dht: KadDHT) -> None:
        self.dht = dht

    async def publish(self, descriptor_bytes: bytes) -> FederationDescriptor:
        """Verify the descriptor, store it locally and at the closest peers under its key; returns it.

        Raises DescriptorError (it does not verify) or DescriptorConflict (this node holds another one there).
        """
        descriptor = verify_descriptor(descriptor_bytes)
        await self.dht.put_value(descriptor_key(descriptor.name, descriptor.creator), descriptor_bytes)
        return descriptor

    async def descriptors(self, name: str, creator: str) -> list[FederationDescriptor]:
        """Every distinct valid descriptor of (`name`, `creator`) held locally or by the closest peers."""
        return [descriptor for descriptor, _ in await self._signed(name, creator)]

    async def _signed(self, name: str, creator: str) -> list[tuple[FederationDescriptor, bytes]]:
        key = descriptor_key(name, creator)
        found: dict[str, tuple[FederationDescriptor, bytes]] = {}
        for value in await dht_values(self.dht, key, lambda value: verify_descriptor(value, key)):
            descriptor = verify_descriptor(value, key)
            if (descriptor.name, descriptor.creator) == (name, creator):
                found.setdefault(descriptor.federation_id, (descriptor, value))
        return list(found.values())

    async def fetch(self, name: str, creator: str, federation_id: str | None = None) -> FederationDescriptor | None:
        """The descriptor of `name` by `creator` (the one with `federation_id` if given), None if none is found.

        Should the creator have signed several under one name (different nodes then hold different ones), the
        earliest `created` wins, then the lowest federation id, so that every node picks the same.
        """
        chosen = await self._choose(name, creator, federation_id)
        return None if chosen is None else chosen[0]

    async def fetch_bytes(self, name: str, creator: str, federation_id: str | None = None) -> bytes | None:
        """The signed bytes of the descriptor `fetch` chooses (what a joiner hands on), None if none is found."""
        chosen = await self._choose(name, creator, federation_id)
        return None if chosen is None else chosen[1]

    async def _choose(
        self, name: str, creator: str, federation_id: str | None
    ) -> tuple[FederationDescriptor, bytes] | None:
        candidates = await self._signed(name, creator)
        if federation_id is not None:
            candidates = [c for c in candidates if c[0].federation_id == federation_id]
        if len(candidates) > 1:
            log.warning("creator %s signed %d descriptors named %r", creator, len(candidates), name)
        return min(candidates, key=lambda c: (c[0].created, c[0].federation_id), default=None)
