"""WS /v1/realtime: live speech in, text + speech out, server VAD and barge-in (OpenAI Realtime event names)."""
from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
