"""Start `vbatch serve`: build the engine, then serve its app with uvicorn until stopped."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import uvicorn

from vbatch.engine.config import EngineConfig
from vbatch.engine.llm_engine import LLMEngine
from vbatch.entrypoints.openai.app import build_app

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Where and how to listen. `host` defaults to loopback only: listening on other
    interfaces is a choice (`--host 0.0.0.0`). `served_model_names` default to the `--model`
    value. `api_key`: every /v1 route needs `Authorization: Bearer <api_key>`."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    log_level: str = "info"

    def validate(self) -> None:
        """Raise ValueError for a port outside 0..65535 or a blank model name."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if any(not name.strip() for name in self.served_model_names):
            raise ValueError("--served-model-name must not be blank")


def run_server(engine_config: EngineConfig, settings: ServerSettings) -> None:
    """Load the engine, serve until SIGINT/SIGTERM (uvicorn's graceful shutdown), then stop
    the engine loop and the engine's workers."""
    settings.validate()
    engine = LLMEngine(engine_config)
    try:
        names = settings.served_model_names or [engine_config.model
                                                or engine.resolved_model.path.name]
        app = build_app(engine, served_model_names=names, api_key=settings.api_key)
        logger.info("serving %s on http://%s:%d", ", ".join(names), settings.host,
                    settings.port)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
