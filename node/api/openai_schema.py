"""OpenAI-compatible request schemas (strict: wrong types are errors, not coercions) and error objects."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from node.inference.llama_backend import SamplingParams

MAX_STOP_STRINGS = 4


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """A content part; only text parts are supported by this text-only node."""

    type: Literal["text"]
    text: str


class FunctionCallIn(_Strict):
    """An earlier call's function: its name and its arguments (a JSON string)."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=65_536)


class ToolCallIn(_Strict):
    """A tool call the assistant made earlier in the conversation."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=16)
    tool_call_id: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    """`stream_options`: include a final usage chunk when streaming."""

    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported by this node")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this node")
        return v

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> SamplingParams:
        """The sampling parameters of this request."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
        )

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: the schema the answer must follow."""

    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`response_format`: free text, any JSON object, or JSON following a schema (generated under a grammar)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with a schema")
        return self


UNSUPPORTED = ("logit_bias", "top_logprobs", "functions", "function_call", "audio", "prediction")
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionSpec(_Strict):
    """A function the model may call: name, description, parameters (a JSON Schema)."""

    name: str = Field(pattern=TOOL_NAME)
    description: str = Field(default="", max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    """`tools[i]`: a function tool."""

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    """`tool_choice.function`."""

    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(_Strict):
    """`tool_choice` naming one function."""

    type: Literal["function"]
    function: NamedFunction


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)  # Mirador: the memory to use
    memory: bool = True  # Mirador: false = no memories injected and this exchange not remembered
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    # OpenAI parameters this node cannot honour: refused when given (anything but null/empty), never ignored
    logit_bias: dict[str, Any] | None = None
    top_logprobs: int | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: at most one call is made per answer

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v not in (None, {}, [], "none"):
            raise ValueError("not supported by this node")
        return v

    tools: list[ToolSpec] | None = Field(default=None, max_length=64)
    # Mirador: tools the node runs itself (GET /v1/tools), results fed back until the answer; added to the
    # answering personality's own
    node_tools: list[ToolName] | None = Field(default=None, max_length=32)

    @model_validator(mode="after")
    def _tools_or_format(self) -> "ChatCompletionRequest":
        if (self.tools or self.node_tools) and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give tools or a JSON response_format, not both (each constrains the whole answer)")
        if self.tools and self.node_tools:
            raise ValueError("give tools (you run them) or node_tools (the node runs them), not both")
        return self

    def tool_mode(self) -> str | None:
        """None (no tools: free text), or `auto`, `required`, or the name of the function that must be called."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def tool_list(self) -> list[dict[str, Any]]:
        """The tools as {name, description, parameters}."""
        return [t.function.model_dump(exclude={"strict"}) for t in self.tools or []]

    def limit(self) -> int | None:
        """The requested completion-token limit, if any."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"exactly one prompt is supported, got {len(v)}")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this node")
        return v

    def text(self) -> str:
        """The prompt text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def limit(self) -> int | None:
        """The requested completion-token limit, if any."""
        return self.max_tokens


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic/FastAPI validation errors into (one readable message, the first bad parameter).

    Errors of one parameter (e.g. each branch of `str | list`) are merged: "'x': A or B (got ...)".
    """
    by_param: dict[str | None, tuple[list[str], Any]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"malformed JSON body: {ctx.get('error', err.get('msg'))}", None
        param = _loc_to_param([p for p in err.get("loc", ()) if p != "body"])
        msg = "is required" if err.get("type") == "missing" else str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        msgs, _ = by_param.setdefault(param, ([], err.get("input")))
        if msg not in msgs:
            msgs.append(msg)
    parts = []
    for param, (msgs, got) in list(by_param.items())[:5]:
        text = " or ".join(msgs)
        if msgs != ["is required"]:
            shown = repr(got)
            text += f" (got {shown[:57] + '...' if len(shown) > 60 else shown})"
        parts.append(f"'{param}': {text}" if param else text)
    if not parts:
        return "invalid request body", None
    return "; ".join(parts), next(iter(by_param))


def _loc_to_param(loc: list[Any]) -> str | None:
    # pydantic adds the union branch name (e.g. 'str', 'list[TextPart]') to the location; drop those.
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "none"}):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None
