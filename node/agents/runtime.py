"""The node's parts as agents use them (node.agents.service.Runtime): memory search, one completion on the base
model, the node's tools."""

from typing import Any

import trio

from node.agents.service import Runtime
from node.inference.engine import GenerationRequest
from node.inference.llama_backend import SamplingParams
from node.state import NodeState
from node.tools.registry import ToolReason, ToolRefused


def node_runtime(node: NodeState) -> Runtime:
    """A Runtime over a running node."""

    async def search(query: str, k: int, namespace: str) -> list[str]:
        if node.memory is None:
            return []
        hits = await trio.to_thread.run_sync(node.memory.search, namespace, query, k)
        return [h.memory.text for h in hits]

    async def complete(prompt: str, max_tokens: int) -> str:
        tokens = await trio.to_thread.run_sync(node.model.chat_tokens, [{"role": "user", "content": prompt}])
        request = GenerationRequest(
            prompt_tokens=tokens,
            sampling=SamplingParams(),
            max_tokens=max(1, min(max_tokens, node.settings.max_tokens)),
            stream=False,
        )
        job = await node.engine.submit(request, node.config.api.queue_timeout_s)
        try:
            text = "".join([delta async for delta in job.text()])
        finally:
            job.cancel()
        if job.error:
            raise RuntimeError(f"the model failed: {job.error}")
        return text

    async def tool(name: str, arguments: dict[str, Any]) -> str:
        if node.tools is None:
            raise ToolRefused(ToolReason.UNAVAILABLE, "tools are off on this node ([tools] enabled = false)")
        return await node.tools.registry.call(name, arguments)

    return Runtime(search, complete, tool)
