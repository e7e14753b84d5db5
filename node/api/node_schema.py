"""Schemas of Mirador's own API routes (feedback, training): strict, unknown fields refused."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from marketplace.manifest import NAME_RE as ARTIFACT_NAME_RE
from node.adapters.personalities import NAME_RE


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FeedbackRequest(_Closed):
    """`POST /v1/feedback`: a rating (1-5), a correction, or both, for one recent chat completion."""

    completion_id: str = Field(min_length=1, max_length=128)
    rating: int | None = Field(default=None, ge=1, le=5)
    correction: str | None = Field(default=None, min_length=1, max_length=32_768)

    @model_validator(mode="after")
    def _something(self) -> "FeedbackRequest":
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating (1-5), a correction, or both")
        return self


class DPRequest(_Closed):
    """Differential privacy of a training job: target ε at δ, per-example clipping norm."""

    epsilon: float = Field(gt=0, le=100)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)


class TrainRequest(_Closed):
    """`POST /v1/train`: train adapter `adapter` on a data file on this machine or on stored feedback."""

    adapter: str = Field(pattern=NAME_RE)
    data: str | None = Field(default=None, min_length=1, max_length=4096)
    from_feedback: bool = False
    from_memory: str | None = Field(default=None, min_length=1, max_length=63)  # a memory namespace
    target: Literal["qv", "all"] = "qv"
    steps: int | None = Field(default=None, ge=1, le=100_000)
    rank: int | None = Field(default=None, ge=1, le=256)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    dp: DPRequest | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "TrainRequest":
        if [self.data is not None, self.from_feedback, self.from_memory is not None].count(True) != 1:
            raise ValueError(
                "give exactly one of 'data' (a .txt or .jsonl path on the node), 'from_feedback': true or "
                "'from_memory': NAMESPACE"
            )
        return self

    def config(self) -> dict[str, object]:
        """The training job's `config`."""
        out: dict[str, object] = {"targets": self.target}
        for key in ("steps", "rank", "learning_rate"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        if self.dp is not None:
            out["dp"] = self.dp.model_dump()
        return out


class ConnectRequest(_Closed):
    """`POST /v1/node/connect`: dial a peer by its full multiaddr (…/p2p/PEER_ID)."""

    addr: str = Field(min_length=8, max_length=512)


class AnnounceRequest(_Closed):
    """`POST /v1/market/announce`: put this node's signed record of `name` into the DHT."""

    name: str = Field(pattern=ARTIFACT_NAME_RE)


class PullRequest(_Closed):
    """`POST /v1/market/pull`: fetch NAME[@VERSION] or an envelope CID from peers, verify it, install it."""

    target: str = Field(min_length=1, max_length=256)
    trust_publisher: bool = False
    replace_publisher: bool = False  # a name installed from another publisher switches to this one's
    install: bool = True
