"""Endpoint backends: our server protocol, vLLM prompt embeddings, OpenAI-compatible text APIs."""
