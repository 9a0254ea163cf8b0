"""Heron's HTTP layer: the OpenAI-compatible server (protocol models, routes, streaming)."""
