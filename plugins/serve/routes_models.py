"""/health and /v1/models: what the server serves and whether it is ready."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from superlinear.api.types import ModelInfo

from . import bounds
from .runtime import Runtime

HEALTH = bounds.declare("GET", "/health", body_bytes=0, depth=None,
                        reply="bookkeeping only: never waits for the worker")
MODELS = bounds.declare("GET", "/v1/models", body_bytes=0, depth=None)
MODEL = bounds.declare("GET", "/v1/models/{model_id:path}", body_bytes=0, depth=None)


def add_routes(app: FastAPI, rt: Runtime) -> None:
    @app.get(HEALTH.path)
    async def health():
        # Readiness probes and load balancers read the status code: 200 only once the model is
        # loaded and the server takes requests; 503 (same body) while loading, failed or stopping.
        await rt.retry_failed_persists()
        body = rt.health()
        if body["status"] == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get(MODELS.path)
    async def models():
        return {"object": "list", "data": [_model_card(rt, rt.ready_api().get_model())]}

    @app.get(MODEL.path)
    async def model(model_id: str):
        return _model_card(rt, rt.ready_api().get_model(model_id))


def _model_card(rt: Runtime, model: ModelInfo) -> dict:
    """OpenAI's model object with spl's fields: vLLM's ``max_model_len`` (the context the model was
    trained for, or the operator's limit), and beside it what the memory budget lets one session
    hold (a longer context than trained runs, but is untested ground)."""
    info: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = dict(rt.api.model.info())
    return {"id": model["id"], "object": "model", "created": int(rt.ready_at or rt.started_at), "owned_by": "spl",
            **{k: v for k, v in model.items() if k != "id"}, "info": _jsonable(info)}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)
