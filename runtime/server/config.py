"""What ``kimia-edge serve`` is configured with; validated once, before the model is loaded."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

LOOPBACK_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """``max_queue``: turns that may wait while one runs (one more is refused with 429 + Retry-After).
    ``max_upload_bytes``: largest audio upload or decoded ``input_audio``. ``api_key``: required as
    ``Authorization: Bearer KEY`` when set; a bind address other than loopback needs one. ``max_steps``: a cap on
    every turn's LLM steps (a request's ``max_tokens`` may only lower it)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_queue: int = 4
    max_upload_bytes: int = 25 * 2**20  # OpenAI's limit for audio uploads
    model_name: str = "kimi-audio"
    max_steps: Optional[int] = None  # cap on LLM steps of every turn (12.5 per second of speech); None: the recipe's

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read: one upload in base64 (4/3 of its bytes) plus 1 MiB for the rest of the JSON."""
        return self.max_upload_bytes * 4 // 3 + 2**20

    def validate(self) -> None:
        """Raises ValueError naming the setting that is wrong."""
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"host {self.host!r} is not loopback: serving beyond this machine needs --api-key")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key: use at least 8 characters")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue: expected >= 0, got {self.max_queue}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: expected >= 1, got {self.max_steps}")
        if self.max_upload_bytes < 1024:
            raise ValueError(f"max_upload_bytes: expected >= 1024, got {self.max_upload_bytes}")
