"""The tasks kimia-edge runs, as the official recipe (infer.py) states them: which messages go into the
prompt, which streams come out, and the sampling settings. Written once; the golden pipeline and the runtime
both use it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from kimia_edge.runtime.generation import GenerationConfig
from kimia_edge.runtime.sampler import SamplerParams

TASKS = ("asr", "qa", "chat")

# infer.py's ASR instruction ("convert the audio content to text").
ASR_INSTRUCTION = "请将音频内容转换为文字。"
# infer.py sampling_params: greedy text (top-k 5), audio T=0.8 top-k 10; windows 16 / 64, no penalty.
TEXT_SAMPLING = SamplerParams(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=16)
AUDIO_SAMPLING = SamplerParams(temperature=0.8, top_k=10, repetition_penalty=1.0, repetition_window=64)


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str  # "text" (transcript / answer) or "both" (text + speech)
    instruction: Optional[str] = None  # user text placed before the audio


TASK_TABLE: Dict[str, Task] = {
    "asr": Task("asr", "text", ASR_INSTRUCTION),
    "qa": Task("qa", "text"),
    "chat": Task("chat", "both"),
}


def task_messages(task: str, audio: Any, history: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """Official-style messages for ``task`` on one user clip ``audio``, after ``history`` (earlier turns)."""
    if task not in TASK_TABLE:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    t = TASK_TABLE[task]
    msgs = list(history)
    if t.instruction:
        msgs.append({"role": "user", "message_type": "text", "content": t.instruction})
    msgs.append({"role": "user", "message_type": "audio", "content": audio})
    return msgs


def generation_config(task: str, seed: Optional[int] = None, greedy_audio: bool = False, **overrides: Any) -> GenerationConfig:
    """The official sampling recipe for ``task``; ``greedy_audio`` makes the audio stream greedy too (tests)."""
    audio = SamplerParams(0.0, AUDIO_SAMPLING.top_k, 1.0, AUDIO_SAMPLING.repetition_window) if greedy_audio else AUDIO_SAMPLING
    return GenerationConfig(output_type=TASK_TABLE[task].output_type, text=TEXT_SAMPLING, audio=audio, seed=seed, **overrides)
