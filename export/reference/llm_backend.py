"""`TorchLLMBackend`: the runtime `LLMBackend` protocol implemented with the PyTorch reference (numpy in / out)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from kimia_edge.export.reference.llm import KVCache, MoonshotKimia

__all__ = ["TorchLLMBackend"]


class TorchLLMBackend:
    """Wraps a :class:`MoonshotKimia`; keeps its KV cache and position counter. Logits are returned as float32."""

    def __init__(self, model: MoonshotKimia) -> None:
        self.model = model.eval()
        self._cache: Optional[KVCache] = None
        self._position = 0

    @property
    def position(self) -> int:
        """Next position id (= positions consumed so far)."""
        return self._position

    def reset(self) -> None:
        self._cache = None
        self._position = 0

    def _run(self, audio: np.ndarray, text: np.ndarray, features: Optional[np.ndarray],
             mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        t = audio.shape[0]
        out = self.model(
            torch.from_numpy(np.ascontiguousarray(audio, dtype=np.int64))[None],
            torch.from_numpy(np.ascontiguousarray(text, dtype=np.int64))[None],
            features=None if features is None else torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            continuous_mask=None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))[None],
            positions=torch.arange(self._position, self._position + t),
            cache=self._cache, last_only=True)
        self._position += t
        return (out.text_logits[0, -1].float().numpy(), out.audio_logits[0, -1].float().numpy())

    def prefill(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray],
                continuous_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        audio_ids, text_ids = np.asarray(audio_ids).reshape(-1), np.asarray(text_ids).reshape(-1)
        if audio_ids.shape != text_ids.shape:
            raise ValueError(f"audio_ids {audio_ids.shape} and text_ids {text_ids.shape} must have equal length")
        self.reset()
        self._cache = self.model.new_cache()
        return self._run(audio_ids, text_ids, features, continuous_mask)

    def step(self, audio_id: int, text_id: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            raise RuntimeError("step() before prefill()")
        return self._run(np.array([audio_id]), np.array([text_id]), None, None)
