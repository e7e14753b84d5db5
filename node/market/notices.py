"""The marketplace's gossip notice: a publisher released an artifact (registered with the notice board's types)."""

from typing import Annotated, Literal

import msgspec

from crypto.identity import is_fingerprint
from marketplace.cid import Cid
from marketplace.manifest import NAME_RE
from marketplace.semver import SemVer
from node.p2p.notices import Notice, notice_type

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE)]


@notice_type
class ArtifactPublished(Notice, tag="artifact.published", frozen=True, kw_only=True):
    """A publisher released `name@version` (a model, adapter or chain); its signed envelope is at `envelope_cid`."""

    name: Name
    version: Annotated[str, msgspec.Meta(min_length=5, max_length=64)]
    kind: Literal["model", "adapter", "chain"]
    publisher: Annotated[str, msgspec.Meta(max_length=40)]
    envelope_cid: Annotated[str, msgspec.Meta(min_length=2, max_length=128)]

    def check(self) -> None:
        """The version is semver, the publisher a fingerprint, the envelope CID parses."""
        SemVer.parse(self.version)
        if not is_fingerprint(self.publisher):
            raise ValueError(f"publisher: not a fingerprint: {self.publisher!r}")
        Cid.parse(self.envelope_cid)
