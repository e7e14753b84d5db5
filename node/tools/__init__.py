"""Tools: OpenAI tool calls generated under grammars (and, later, node-side tools, sandboxing, MCP, agents)."""
