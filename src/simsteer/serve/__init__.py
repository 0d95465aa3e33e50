"""``sims serve``: an OpenAI-compatible HTTP server for steered models."""
