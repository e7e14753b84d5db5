"""The upload cap (node.market.rate_limit) on a controlled clock, and on real block servers."""

import time
from pathlib import Path

import pytest
import trio

from marketplace.blockstore import BlockStore
from node.market.block_exchange import BlockServer, fetch_dag
from node.market.bulk import BulkServer
from node.market.rate_limit import UploadLimit, limit_of
from tests.node.test_block_exchange import DEADLINE, add_file, connect_all, opener, random_file, running_nodes
from tests.node.test_bulk_channel import bulk_opener


def test_the_bucket_lets_a_burst_through_then_spaces_what_follows_at_the_rate() -> None:
    # Arrange: 1 MB/s on a clock that only moves when told
    now = [0.0]
    limit = UploadLimit(1e6, clock=lambda: now[0])
    # Act / Assert: a quarter second's worth goes at once; then each byte waits its turn
    assert limit.reserve(250_000) == 0.0
    assert limit.reserve(500_000) == pytest.approx(0.5)
    assert limit.reserve(500_000) == pytest.approx(1.0)  # behind the previous reservation
    now[0] = 1.0
    assert limit.reserve(0) == pytest.approx(0.0)  # the debt is paid by the time it was due
    now[0] = 10.0
    assert limit.reserve(250_000) == 0.0  # idle time refills up to the burst only
    assert limit.reserve(1) > 0.0


def test_no_limit_never_waits_and_a_negative_rate_is_refused() -> None:
    # Arrange / Act / Assert
    assert limit_of(0).reserve(10**12) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        UploadLimit(-1)


@pytest.mark.parametrize("channel", ["bulk", "libp2p"])
def test_a_capped_provider_serves_no_faster_than_its_cap(channel: str, tmp_path: Path) -> None:
    # Arrange: 4 MiB served at 8 MB/s at most (a burst of 2 MB): at least (4.19 - 2) / 8 = 0.27 s
    random_file(tmp_path / "f.bin", 4 * 2**20, seed=21)
    root = add_file(tmp_path / "p", tmp_path / "f.bin")
    local = BlockStore(tmp_path / "local")

    async def main() -> float:
        with trio.fail_after(DEADLINE):
            async with running_nodes(2) as (provider, client):
                upload = limit_of(8)
                BlockServer(BlockStore(tmp_path / "p"), upload=upload).attach(provider)
                bulk = BulkServer(BlockStore(tmp_path / "p"), upload=upload)
                bulk.attach(provider)
                peers = await connect_all(client, [provider])
                try:
                    t0 = time.perf_counter()
                    report = await fetch_dag(
                        root, peers, opener(client), local, open_bulk=bulk_opener(client) if channel == "bulk" else None
                    )
                    elapsed = time.perf_counter() - t0
                finally:
                    bulk.stop()
                assert report.channels == {str(peers[0]): channel}
                return elapsed

    # Act
    elapsed = trio.run(main)
    # Assert: a lower bound only (a slow machine can take longer, never shorter)
    assert elapsed >= (4 * 2**20 + 1000 - 2e6) / 8e6 * 0.95
