"""Special token ids of the Kimi-Audio text vocabulary (reference §1.3), read from the snapshot.

Names follow `kimia_infer/utils/special_tokens.py` (ExtraTokens). The ids come from the snapshot's
tokenizer_config.json (`added_tokens_decoder`: id -> {"content": name}) and config.json (`kimia_media_begin/end`);
the documented official ids are the defaults when a file does not carry a token.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Mapping, Optional

__all__ = ["SpecialTokens", "TOKEN_NAMES", "TOKENIZER_CONFIG_FILE", "SPECIAL_TOKENS_MAP_FILE",
           "read_added_tokens"]

log = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# field -> token string (the strings instantiate_extra_tokens looks up; [BOS]/[EOS] per TOK-3P).
TOKEN_NAMES: Dict[str, str] = {
    "bos": "[BOS]",
    "eos": "[EOS]",
    "msg_end": "<|im_msg_end|>",
    "user_msg_start": "<|im_user_msg_start|>",
    "assistant_msg_start": "<|im_assistant_msg_start|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "text_blank": "<|im_kimia_text_blank|>",
    "text_eos": "<|im_kimia_text_eos|>",
    "kimia_user_msg_start": "<|im_kimia_user_msg_start|>",
    "kimia_assistant_msg_start": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>",
    "speech_ctd": "<|im_kimia_speech_ctd_id|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Special ids (defaults = official values, reference §1.3; pad = last reserved id, UNKNOWN officially)."""

    bos: int = 151643
    eos: int = 151644
    msg_end: int = 151645                 # audio-stream end of turn; also an audio stop id
    user_msg_start: int = 151646          # exists, not emitted by the prompt manager
    assistant_msg_start: int = 151647     # exists, not emitted by the prompt manager
    media_begin: int = 151661
    media_end: int = 151663               # also an audio stop id
    text_blank: int = 151666              # filler in both streams
    text_eos: int = 151667                # text-stream EOS
    kimia_user_msg_start: int = 151670
    kimia_assistant_msg_start: int = 151671
    speech_ct: int = 151675               # after user audio when output_type == "text"
    speech_ctd: int = 151676              # after user audio when output_type == "both"
    pad: int = 152063                     # tokenizer.pad_id (TOK-3P: last reserved special)

    @property
    def audio_stop_ids(self) -> tuple:
        """Audio ids that end generation in "both" mode (kimia.py `eod_ids`)."""
        return (self.msg_end, self.media_end)

    def by_name(self) -> Dict[str, int]:
        """token string -> id for the named tokens."""
        return {TOKEN_NAMES[f]: getattr(self, f) for f in TOKEN_NAMES}

    @classmethod
    def from_mapping(cls, name_to_id: Mapping[str, int], *, pad: Optional[int] = None,
                     media_begin: Optional[int] = None, media_end: Optional[int] = None,
                     source: str = "tokenizer") -> "SpecialTokens":
        """Builds from token string -> id; absent names keep the documented default (logged)."""
        defaults = cls()
        kwargs = {}
        absent = []
        for field, name in TOKEN_NAMES.items():
            if name in name_to_id:
                kwargs[field] = int(name_to_id[name])
            else:
                absent.append(name)
        if absent and name_to_id:
            log.warning("%s lacks %s; using the documented official ids", source, absent)
        for field, value in (("media_begin", media_begin), ("media_end", media_end)):
            if value is None:
                continue
            if field in kwargs and kwargs[field] != value:
                raise ValueError(f"{source}: {TOKEN_NAMES[field]} is {kwargs[field]} in the tokenizer but "
                                 f"config.json kimia_{field} says {value}")
            kwargs[field] = int(value)
        if pad is not None:
            kwargs["pad"] = int(pad)
        tokens = cls(**{f.name: kwargs.get(f.name, getattr(defaults, f.name)) for f in fields(cls)})
        tokens.validate()
        return tokens

    @classmethod
    def from_snapshot(cls, folder: Path) -> "SpecialTokens":
        """Reads tokenizer_config.json, special_tokens_map.json and config.json of an HF snapshot folder."""
        folder = Path(folder)
        name_to_id = read_added_tokens(folder)
        pad = None
        cfg_path = folder / "config.json"
        media_begin = media_end = None
        if cfg_path.exists():
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            media_begin, media_end = raw.get("kimia_media_begin"), raw.get("kimia_media_end")
        map_path = folder / SPECIAL_TOKENS_MAP_FILE
        if map_path.exists():
            smap = json.loads(map_path.read_text(encoding="utf-8"))
            pad_tok = smap.get("pad_token")
            pad_name = pad_tok.get("content") if isinstance(pad_tok, dict) else pad_tok
            if pad_name is not None:
                if pad_name not in name_to_id:
                    raise ValueError(f"{map_path}: pad_token {pad_name!r} is not an added token of "
                                     f"{TOKENIZER_CONFIG_FILE}")
                pad = name_to_id[pad_name]
        return cls.from_mapping(name_to_id, pad=pad, media_begin=media_begin, media_end=media_end,
                                source=str(folder))

    def validate(self) -> None:
        """Raises ValueError if two named tokens share an id or an id is negative."""
        seen: Dict[int, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SpecialTokens.{f.name}={value!r}: expected a non-negative int")
            if value in seen:
                raise ValueError(f"SpecialTokens.{f.name}={value}: same id as {seen[value]}")
            seen[value] = f.name


def read_added_tokens(folder: Path) -> Dict[str, int]:
    """token string -> id from ``tokenizer_config.json``'s ``added_tokens_decoder`` (empty if absent)."""
    path = Path(folder) / TOKENIZER_CONFIG_FILE
    if not path.exists():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    out: Dict[str, int] = {}
    for key, entry in (raw.get("added_tokens_decoder") or {}).items():
        content = entry["content"] if isinstance(entry, dict) else entry
        if content in out:
            raise ValueError(f"{path}: token {content!r} listed twice ({out[content]} and {key})")
        out[content] = int(key)
    return out
