"""OpenAI-shaped HTTP endpoints: /health, /v1/models, /v1/audio/transcriptions, /v1/chat/completions."""
from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
