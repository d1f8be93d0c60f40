"""Ways to reach the engine besides `vbatch run`: the OpenAI-compatible server."""
