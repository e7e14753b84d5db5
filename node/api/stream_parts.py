"""The pieces every generated stream or answer is made of: SSE lines, usage, the error a finished job ended with."""

import json
from typing import Any

from node.api.openai_schema import error_body
from node.inference.engine import Job


def sse(obj: dict[str, Any]) -> str:
    """One SSE data line."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(job: Job) -> dict[str, Any]:
    """The OpenAI usage object of a finished job (`cached_tokens`: its prompt's prefix found in the KV cache)."""
    s = job.stats
    return usage_of(s.prompt_tokens, s.completion_tokens, s.reused_tokens)


def usage_of(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """An OpenAI usage object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def end_error(job: Job) -> dict[str, Any] | None:
    """The OpenAI error body a job ended with (failed, or cut by shutdown), or None."""
    if job.error:
        return error_body(job.error, "server_error", code=job.error_code)
    if job.cut_by_shutdown:
        return error_body(
            f"the node shut down; the response was cut after {job.stats.completion_tokens} tokens",
            "server_error",
            code="shutting_down",
        )
    return None
