"""Strict request schemas of the memory routes and of OpenAI's /v1/embeddings."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.memory.record import DEFAULT_NAMESPACE, MAX_TEXT_CHARS, check_namespace

MAX_INPUTS = 256
MAX_ITEMS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _InNamespace(_Strict):
    namespace: str = DEFAULT_NAMESPACE

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        try:
            return check_namespace(v)
        except ValueError as exc:
            raise ValueError(getattr(exc, "detail", str(exc))) from None


class EmbeddingsRequest(BaseModel):
    """POST /v1/embeddings (OpenAI): text inputs only; the model's own 384 dimensions."""

    model_config = ConfigDict(strict=True, extra="ignore")
    input: str | list[str] = Field(min_length=1)
    model: str = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
        for text in texts:
            if not text:
                raise ValueError("an input is empty")
            if len(text) > MAX_TEXT_CHARS * 4:
                raise ValueError(f"an input is longer than {MAX_TEXT_CHARS * 4} characters")
        return v

    def texts(self) -> list[str]:
        """The inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class MemoryItem(_Strict):
    """One memory to add."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    kind: Literal["note", "document", "chat", "correction"] = "note"
    source: str = Field(default="", max_length=1024)
    position: int = Field(default=0, ge=0)


class AddMemoriesRequest(_InNamespace):
    """POST /v1/memory."""

    items: list[MemoryItem] = Field(min_length=1, max_length=MAX_ITEMS)


class SearchMemoryRequest(_InNamespace):
    """POST /v1/memory/search."""

    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    limit: int = Field(default=5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    decay: bool = True
    diverse: bool = True
    min_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)


class ForgetRequest(_InNamespace):
    """POST /v1/memory/forget: by ids, by source, by age (created before a time), or the whole namespace."""

    ids: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    source: str | None = Field(default=None, min_length=1, max_length=1024)
    before: float | None = None  # seconds since the epoch
    everything: bool = False


class NamespaceSettingsRequest(_Strict):
    """POST /v1/memory/namespaces/{namespace}."""

    chats: bool


class ImportRequest(_Strict):
    """POST /v1/memory/import: exported memories (a batch of the export's lines)."""

    memories: list[dict[str, object]] = Field(min_length=1, max_length=1000)
