"""Configuration of the Kimi-Audio dual-head LLM (`MoonshotKimiaForCausalLM`), read from the snapshot's config.json.

Torch-free: the runtime and the export side both build their LLM from this dataclass. Field names are the
config.json keys. Defaults are the class defaults of the official `KimiAudioConfig` (configuration_moonshot_kimia.py,
a Qwen2Config subclass) and apply only when config.json lacks a key — exactly what `from_pretrained` would do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .config_parse import malformed_is_value_error, read_json_object

__all__ = ["KimiaConfig", "CONFIG_FILE", "DEFAULT_ROPE_THETA"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

# rope_theta of the real checkpoint is UNKNOWN (reference §2.1 / §6.1). When config.json lacks it, the official
# class falls back to its default, 10 000.0 (KimiAudioConfig.__init__); we do the same and warn.
DEFAULT_ROPE_THETA = 10000.0

# Fields the official class would silently default but whose default is certainly wrong for any Kimi snapshot
# (they describe the tensor shapes): we require them instead.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class KimiaConfig:
    """LLM hyper-parameters (names = config.json keys; dims in elements, ids are token ids)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: Optional[Mapping[str, Any]] = None
    max_position_embeddings: int = 32768  # Qwen2Config default; the real config.json says 8192 (CFG-3P)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"  # kimia.py loads with torch_dtype=bfloat16 regardless
    kimia_mimo_layers: int = 6
    kimia_mimo_audiodelaytokens: int = 5  # class default; config.json says 6; kimia.py ignores it (hard-codes 6)
    kimia_mimo_transformer_from_layer_index: int = 21
    kimia_audio_output_vocab: int = 16896
    kimia_text_output_vocab: int = 152064
    num_audio_special_tokens: int = 512
    num_base_tokens: int = 151643
    kimia_token_offset: int = 152064
    use_whisper_feature: bool = True
    kimia_adaptor_input_dim: int = 5120
    kimia_media_begin: int = 151661
    kimia_media_end: int = 151663
    pad_token_id: Optional[int] = None  # UNKNOWN in the real config.json; only the embedding's padding_idx uses it

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Per-head width: hidden_size // num_attention_heads (the official attention derives it this way)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA): query head h reads KV head h // kv_groups."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_kv_cache_layers(self) -> int:
        """KV caches: main layers 0..N-1 then MIMO layers N..N+M-1 (official legacy tuple order)."""
        return self.num_hidden_layers + self.kimia_mimo_layers

    @property
    def audio_vocab_size(self) -> int:
        """Semantic codebook rows addressable through the embedding: vocab_size - kimia_token_offset."""
        return self.vocab_size - self.kimia_token_offset

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    @malformed_is_value_error
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "KimiaConfig":
        """Builds the config from a parsed config.json; unknown keys are ignored (HF adds many)."""
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required LLM field(s) {missing}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if kwargs.get("num_key_value_heads") is None:  # Qwen2Config: None means multi-head attention
            kwargs["num_key_value_heads"] = raw["num_attention_heads"]
        if "rope_theta" not in raw:
            log.warning("%s has no rope_theta; using the official class default %s (UNKNOWN for the real "
                        "checkpoint, reference §6.1)", source, DEFAULT_ROPE_THETA)
        if "torch_dtype" in kwargs and kwargs["torch_dtype"] is None:
            del kwargs["torch_dtype"]
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "KimiaConfig":
        """Reads config.json at ``path``."""
        path = Path(path)
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_snapshot(cls, folder: Path) -> "KimiaConfig":
        """Reads ``<folder>/config.json`` (the HF snapshot root)."""
        return cls.from_file(Path(folder) / CONFIG_FILE)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (config.json key names)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ---- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the first field that does not fit the others."""
        def bad(field: str, why: str) -> None:
            raise ValueError(f"KimiaConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "kimia_adaptor_input_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "expected a positive int")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"expected a multiple of num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("num_attention_heads", f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"expected a divisor of num_attention_heads={self.num_attention_heads}")
        if self.kimia_mimo_layers < 0:
            bad("kimia_mimo_layers", "expected >= 0")
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            bad("kimia_mimo_transformer_from_layer_index",
                f"expected a main-layer index in [0, {self.num_hidden_layers})")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "expected > 0")
        if not self.rope_theta > 0:
            bad("rope_theta", "expected > 0")
        if self.rope_scaling is not None:
            bad("rope_scaling", "RoPE scaling is not supported by the Kimi-Audio attention (it ignores it); expected null")
        if self.hidden_act != "silu":
            bad("hidden_act", "expected 'silu' (Qwen2MLP)")
        if not 0 < self.kimia_token_offset < self.vocab_size:
            bad("kimia_token_offset", f"expected in (0, vocab_size={self.vocab_size})")
        for name in ("kimia_media_begin", "kimia_media_end"):
            if not 0 <= getattr(self, name) < self.kimia_token_offset:
                bad(name, f"expected a text-vocabulary id < kimia_token_offset={self.kimia_token_offset}")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            bad("torch_dtype", "expected bfloat16, float16 or float32")
