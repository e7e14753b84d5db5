"""The node's long-term memory: embeddings, an embedded Qdrant store per namespace, hybrid retrieval, injection."""
