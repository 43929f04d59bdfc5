"""The OpenAI API: GET /v1/models[/{id}], POST /v1/completions and /v1/chat/completions."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from hetero.serve.generation import generate
from hetero.serve.schemas import APIError
from hetero.serve.state import ServeState, get_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(state: ServeState = Depends(get_state)):
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, state: ServeState = Depends(get_state)):
    if name not in state.known:
        raise APIError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")
    return state.model_card()


@router.post("/v1/completions")
async def completions(request: Request, state: ServeState = Depends(get_state)):
    return await generate(request, "completion", state)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: ServeState = Depends(get_state)):
    return await generate(request, "chat", state)
