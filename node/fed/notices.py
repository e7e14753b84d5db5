"""The federation's gossip notice: a signed federation message routed by the notice board."""

import base64
import binascii
from typing import Annotated, Literal

import msgspec

from node.p2p.notices import Notice, notice_type


@notice_type
class FederationNotice(Notice, tag="federation", frozen=True, kw_only=True):
    """A federation's signed message (a member admitted, a round opened or done), carried as base64 bytes.

    The notice only routes it: the federation layer verifies the signed bytes against the federation's members.
    """

    federation_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    kind: Literal["member", "round.open", "round.done"]
    data: Annotated[str, msgspec.Meta(min_length=4, max_length=3000)]

    def check(self) -> None:
        """`data` is standard base64."""
        try:
            base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data: not base64") from None
