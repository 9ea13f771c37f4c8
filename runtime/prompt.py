"""Prompt builder: chat messages -> the two aligned 12.5 Hz streams the Kimi-Audio LLM reads (reference §1.4).

Every position carries one audio-stream id and one text-stream id, plus a continuous-feature flag:

| message part                              | audio stream                             | text stream  | mask |
|-------------------------------------------|------------------------------------------|--------------|------|
| role start (first message of a role run)  | kimia_user/assistant_msg_start           | blank        | 0    |
| text content (T tokens)                   | blank x T                                | text ids     | 0    |
| audio content (N tokens)                  | media_begin, sem+offset x N, media_end   | blank x N+2  | 1 on the N |
| audio message that ends a role run        | speech_ct (output "text") / ctd ("both") | blank        | 0    |
| end of a role run                         | msg_end                                  | blank        | 0    |
| generation prompt (always)                | kimia_assistant_msg_start                | blank        | 0    |

Same layout logic as the official ``KimiAPromptManager.get_prompt``; tokenization is injected, so this module is
pure (no models, no files).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .special_tokens import SpecialTokens

__all__ = ["Message", "AudioEncoding", "FeatureSpan", "Prompt", "build_prompt", "OUTPUT_TYPES", "ROLES"]

OUTPUT_TYPES = ("text", "both")
ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio", None)


@dataclass(frozen=True)
class Message:
    """One chat message. ``content`` is text for "text" messages and whatever the injected audio tokenizer takes
    (path, waveform…) for "audio" messages; ``message_type=None`` adds only the role markers."""

    role: str
    message_type: Optional[str]
    content: Any = None

    @classmethod
    def coerce(cls, m: Union["Message", Mapping[str, Any]]) -> "Message":
        """Accepts a Message or an official-style dict {"role", "message_type", "content"}."""
        if isinstance(m, Message):
            return m
        return cls(role=m["role"], message_type=m.get("message_type"), content=m.get("content"))


@dataclass(frozen=True)
class AudioEncoding:
    """What the injected audio tokenizer returns for one clip.

    semantic_ids: [N] int, codebook ids at 12.5 Hz (without kimia_token_offset).
    features: [N', D] float32 continuous Whisper features at 12.5 Hz (D = 5120 real), N' >= N; or None.
    """

    semantic_ids: np.ndarray
    features: Optional[np.ndarray] = None


@dataclass(frozen=True)
class FeatureSpan:
    """Positions [start, start+length) of one audio message's semantic tokens (= its continuous features)."""

    start: int
    length: int


@dataclass(frozen=True)
class Prompt:
    """audio_ids / text_ids: [L] int64; continuous_mask: [L] bool; spans: per audio message in order;
    features: per audio message [N_k, D] float32 (trimmed to N_k), or empty if the tokenizer gave none."""

    audio_ids: np.ndarray
    text_ids: np.ndarray
    continuous_mask: np.ndarray
    spans: Tuple[FeatureSpan, ...]
    features: Tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return int(self.audio_ids.shape[0])

    def stacked_features(self) -> Optional[np.ndarray]:
        """[sum N_k, D] rows in position order (row r belongs to the r-th True of continuous_mask), or None."""
        if not self.features:
            return None
        return np.concatenate(self.features, axis=0)


class _Streams:
    def __init__(self) -> None:
        self.audio: List[int] = []
        self.text: List[int] = []
        self.mask: List[bool] = []

    def add(self, audio: Sequence[int], text: Sequence[int], continuous: bool = False) -> None:
        if len(audio) != len(text):
            raise ValueError(f"stream parts must align: {len(audio)} audio vs {len(text)} text ids")
        self.audio.extend(int(a) for a in audio)
        self.text.extend(int(t) for t in text)
        self.mask.extend([continuous] * len(audio))


def build_prompt(
    messages: Sequence[Union[Message, Mapping[str, Any]]],
    output_type: str,
    tokens: SpecialTokens,
    token_offset: int,
    tokenize_text: Callable[[str], Sequence[int]],
    tokenize_audio: Callable[[Any], AudioEncoding],
) -> Prompt:
    """Builds the aligned streams for ``messages`` (roles "user"/"assistant"; any number of turns, audio in either
    role). ``output_type`` "text" or "both" selects the ct/ctd marker. ``token_offset`` = config
    ``kimia_token_offset`` (added to semantic ids). Audio features are collected for every audio message."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
    msgs = [Message.coerce(m) for m in messages]
    blank = tokens.text_blank
    role_start = {"user": tokens.kimia_user_msg_start, "assistant": tokens.kimia_assistant_msg_start}
    marker = tokens.speech_ct if output_type == "text" else tokens.speech_ctd
    s = _Streams()
    spans: List[FeatureSpan] = []
    feats: List[Optional[np.ndarray]] = []

    for idx, msg in enumerate(msgs):
        if msg.role not in ROLES:
            raise ValueError(f"messages[{idx}].role: expected one of {ROLES}, got {msg.role!r}")
        if msg.message_type not in MESSAGE_TYPES:
            raise ValueError(f"messages[{idx}].message_type: expected one of {MESSAGE_TYPES}, got {msg.message_type!r}")
        starts_run = idx == 0 or msgs[idx - 1].role != msg.role
        ends_run = idx == len(msgs) - 1 or msgs[idx + 1].role != msg.role
        if starts_run:
            s.add([role_start[msg.role]], [blank])
        if msg.message_type == "text":
            ids = [int(t) for t in tokenize_text(msg.content)]
            s.add([blank] * len(ids), ids)
        elif msg.message_type == "audio":
            enc = tokenize_audio(msg.content)
            sem = np.asarray(enc.semantic_ids, dtype=np.int64).reshape(-1)
            s.add([tokens.media_begin], [blank])
            spans.append(FeatureSpan(start=len(s.audio), length=int(sem.shape[0])))
            s.add((sem + token_offset).tolist(), [blank] * sem.shape[0], continuous=True)
            s.add([tokens.media_end], [blank])
            feats.append(_check_features(enc.features, int(sem.shape[0]), idx))
            if ends_run:
                s.add([marker], [blank])
        if ends_run:
            s.add([tokens.msg_end], [blank])
    s.add([tokens.kimia_assistant_msg_start], [blank])  # generation prompt

    have = [f is not None for f in feats]
    if any(have) and not all(have):
        raise ValueError("the audio tokenizer returned features for some audio messages but not others")
    return Prompt(
        audio_ids=np.asarray(s.audio, dtype=np.int64),
        text_ids=np.asarray(s.text, dtype=np.int64),
        continuous_mask=np.asarray(s.mask, dtype=bool),
        spans=tuple(spans),
        features=tuple(f for f in feats if f is not None),
    )


def _check_features(features: Optional[np.ndarray], n_tokens: int, idx: int) -> Optional[np.ndarray]:
    """[N', D] -> [N, D] float32 (the official model uses the first N rows of each clip's features)."""
    if features is None:
        return None
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 3 and f.shape[0] == 1:
        f = f[0]
    if f.ndim != 2 or f.shape[0] < n_tokens:
        raise ValueError(f"messages[{idx}] features: expected [>= {n_tokens}, D], got {tuple(f.shape)}")
    return np.ascontiguousarray(f[:n_tokens])
