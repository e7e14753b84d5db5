"""The daemon's log: one format for every record, py-libp2p's per-attempt churn left out below debug level."""

import logging
from collections.abc import Iterator

import pytest

from node.daemon import setup_logging

CHURN = "Failed to read DHT message from stream"  # a warning py-libp2p's DHT logs for each failed peer stream


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and "libp2p" loggers back as they were (setup_logging replaces the root's handlers)."""
    root, libp2p = logging.getLogger(), logging.getLogger("libp2p")
    saved = (root.handlers[:], root.level, libp2p.level, libp2p.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    libp2p.setLevel(saved[2])
    libp2p.propagate = saved[3]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_libp2p_records_use_the_node_format_and_churn_shows_only_at_debug(
    level: str, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    setup_logging(level)
    dht = logging.getLogger("libp2p.kad_dht.kad_dht")
    # Act
    dht.warning(CHURN)
    dht.error("an error of py-libp2p")
    logging.getLogger("node.p2p.notices").info("a record of the node")
    # Assert
    lines = capsys.readouterr().err.splitlines()
    assert any(line.endswith(" ERROR libp2p.kad_dht.kad_dht: an error of py-libp2p") for line in lines), lines
    assert any(line.endswith(" INFO node.p2p.notices: a record of the node") for line in lines), lines
    assert sum(CHURN in line for line in lines) == (0 if level == "info" else 1), lines
    assert all(line[:4].isdigit() for line in lines), "a record without the node's timestamped format"


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_lone_nodes_auto_connector_stays_quiet_below_debug(
    level: str, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """py-libp2p's auto-connector sets its own logger to INFO and logs "initiating N new dials" every 10 s."""
    # Arrange
    setup_logging(level)
    connector = logging.getLogger("libp2p.network.auto_connector")
    connector.setLevel(logging.INFO)  # as py-libp2p 0.8.1 does at import
    # Act
    connector.info("Connections (0, in_flight=0) below target (%s); initiating %s new dials", 400, 32)
    # Assert
    err = capsys.readouterr().err
    assert ("initiating 32 new dials" in err) == (level == "debug"), err
