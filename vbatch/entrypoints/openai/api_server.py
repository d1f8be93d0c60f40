"""`python -m vbatch.entrypoints.openai.api_server --model M --tensor-parallel-size T ...`:
`vbatch serve` under vLLM's module path and flag names (see `cli.py` for the flags).

The server itself: `app.build_app` (routes) and `server.run_server` (engine + uvicorn),
re-exported here for code that imports them from vLLM's module path.
"""
from __future__ import annotations

from vbatch.entrypoints.openai.app import build_app
from vbatch.entrypoints.openai.cli import serve_command
from vbatch.entrypoints.openai.server import ServerSettings, run_server

__all__ = ["ServerSettings", "build_app", "main", "run_server"]


def main() -> None:
    """Run the server command line (vLLM's flags)."""
    serve_command(prog_name="python -m vbatch.entrypoints.openai.api_server")


if __name__ == "__main__":
    main()
