"""`vbatch serve`: an OpenAI-compatible HTTP server on one vbatch engine."""
