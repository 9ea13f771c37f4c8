"""Configuration of the flow-matching DiT detokenizer (torch-free).

- ``DitConfig``: the snapshot's ``audio_detokenizer/config.yaml`` as ``StreamingSemanticFMWrapper.from_pretrained``
  reads it (kimia_infer/models/detokenizer/semantic_fm_prefix_streaming.py): the ``model.dit`` section builds
  ``DiTPrefix`` (flow_matching/model.py), the top-level ``normalize_mel`` / ``mel_mean`` / ``mel_std`` set the mel
  normalisation. Defaults exist only where the official loader has one (``model_config.get(key, default)``); the
  keys it indexes directly are required. Construction is from a plain dict (the parsed YAML); reading the YAML file
  itself is the export side's job (``kimia_edge.export.snapshot.detokenizer``), so this module needs no yaml.
The streaming schedule (``StreamingConfig``) is part of the bundle contract: ``kimia_edge.runtime.spec.streaming``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .config_parse import malformed_is_value_error

__all__ = [
    "DitConfig",
    "FFN_TYPES",
    "POSITION_EMBEDDING_TYPES",
    "SUPPORTED_FFN_TYPE",
    "TIMESTEP_FREQUENCY_DIM",
    "TIMESTEP_MAX_PERIOD",
    "TIMESTEP_SCALE",
    "LAYER_NORM_EPS",
]

# ---- constants of the official code (not in config.yaml) -----------------------------------------------------
# TimestepEmbedder(hidden_size, frequency_embedding_size=256), timestep_embedding(max_period=10000) (model.py).
TIMESTEP_FREQUENCY_DIM = 256
TIMESTEP_MAX_PERIOD = 10000.0
# The ODE wrapper feeds the network t_int = long(t * 1000) (flow_matching/ode_wrapper.py forward).
TIMESTEP_SCALE = 1000
# nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6): norm1 / norm2 / norm_final (dit_block.py).
LAYER_NORM_EPS = 1e-6
# ffn_type values the official DiTBlock knows; only "vanilla_mlp" (timm Mlp, GELU-tanh) is implemented there, every
# other value raises NotImplementedError in DiTBlock.__init__ (dit_block.py). The loader's default is "conv1d_conv1d".
FFN_TYPES = ("vanilla_mlp", "conv1d_conv1d")
SUPPORTED_FFN_TYPE = "vanilla_mlp"
# DiTPrefix position_embedding_type: nn.Embedding(max_seq_len+1), SinusoidalPositionalEmbedding, or none (model.py).
POSITION_EMBEDDING_TYPES = ("learnable", "sincos", "skip")

# ---- official loader defaults (semantic_fm_prefix_streaming.py, StreamingSemanticFMWrapper.from_pretrained) ------
_DEFAULT_FFN_TYPE = "conv1d_conv1d"
_DEFAULT_FFN_GATED_GLU = True
_DEFAULT_FFN_ACT_LAYER = "gelu"
_DEFAULT_FFN_CONV_KERNEL_SIZE = 5
_DEFAULT_USE_ROPE = False
_DEFAULT_ROPE_MAX_POSITION_EMBEDDINGS = 4096
_DEFAULT_ROPE_BASE = 10000.0
_DEFAULT_ROPE_INTERPOLATION_FACTOR = 1.0

_REQUIRED_DIT = ("input_size", "semantic_vocab_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "position_embedding_type", "max_seq_len")
_REQUIRED_TOP = ("normalize_mel", "mel_mean", "mel_std")


@dataclass(frozen=True)
class DitConfig:
    """DiT hyper-parameters (names = config.yaml keys; ``rope_params`` flattened into ``rope_*``).

    ``semantic_vocab_size`` is the YAML value; the embedding has one more row (``embedding_rows``) because the loader
    adds the CFG id (= semantic_vocab_size, unused at inference). Mel tensors are [T, input_size] at 50 Hz; the
    network works on ``(mel - mel_mean) / mel_std`` when ``normalize_mel``.
    """

    input_size: int
    semantic_vocab_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    position_embedding_type: str
    max_seq_len: int
    normalize_mel: bool
    mel_mean: Optional[float]
    mel_std: Optional[float]
    ffn_type: str = _DEFAULT_FFN_TYPE
    ffn_gated_glu: bool = _DEFAULT_FFN_GATED_GLU          # unused by vanilla_mlp; kept to round-trip the file
    ffn_act_layer: str = _DEFAULT_FFN_ACT_LAYER           # unused by vanilla_mlp (GELU-tanh is hard-coded there)
    ffn_conv_kernel_size: int = _DEFAULT_FFN_CONV_KERNEL_SIZE  # unused by vanilla_mlp
    use_rope: bool = _DEFAULT_USE_ROPE
    rope_max_position_embeddings: int = _DEFAULT_ROPE_MAX_POSITION_EMBEDDINGS
    rope_base: float = _DEFAULT_ROPE_BASE
    rope_interpolation_factor: float = _DEFAULT_ROPE_INTERPOLATION_FACTOR

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    @malformed_is_value_error
    def from_dict(cls, data: Mapping[str, Any]) -> "DitConfig":
        """Builds and validates the config from the parsed ``config.yaml`` (the whole document: ``model.dit`` plus
        the top-level mel normalisation keys). Unknown keys (training settings) are ignored."""
        model = data.get("model") if isinstance(data, Mapping) else None
        dit = model.get("dit") if isinstance(model, Mapping) else None
        if not isinstance(dit, Mapping):
            raise ValueError("detokenizer config: expected a mapping at model.dit, got "
                             f"{type(dit).__name__}")
        missing = [f"model.dit.{k}" for k in _REQUIRED_DIT if k not in dit]
        missing += [k for k in _REQUIRED_TOP if k not in data]
        if missing:
            raise ValueError(f"detokenizer config: missing required field(s) {missing}")
        rope = dit.get("rope_params")
        if rope is None:
            rope = {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"model.dit.rope_params: expected a mapping, got {type(rope).__name__}")
        # When rope_params is absent the loader substitutes a whole default dict; when present, DiTPrefix indexes
        # all three keys, so a partial dict would raise there. We require all three in that case too.
        if dit.get("rope_params") is not None:
            absent = [k for k in ("max_position_embeddings", "rope_base", "rope_interpolation_factor") if k not in rope]
            if absent:
                raise ValueError(f"model.dit.rope_params: missing key(s) {absent}")
        cfg = cls(
            input_size=int(dit["input_size"]),
            semantic_vocab_size=int(dit["semantic_vocab_size"]),
            hidden_size=int(dit["hidden_size"]),
            depth=int(dit["depth"]),
            num_heads=int(dit["num_heads"]),
            mlp_ratio=float(dit["mlp_ratio"]),
            position_embedding_type=str(dit["position_embedding_type"]),
            max_seq_len=int(dit["max_seq_len"]),
            normalize_mel=bool(data["normalize_mel"]),
            mel_mean=None if data["mel_mean"] is None else float(data["mel_mean"]),
            mel_std=None if data["mel_std"] is None else float(data["mel_std"]),
            ffn_type=str(dit.get("ffn_type", _DEFAULT_FFN_TYPE)),
            ffn_gated_glu=bool(dit.get("ffn_gated_glu", _DEFAULT_FFN_GATED_GLU)),
            ffn_act_layer=str(dit.get("ffn_act_layer", _DEFAULT_FFN_ACT_LAYER)),
            ffn_conv_kernel_size=int(dit.get("ffn_conv_kernel_size", _DEFAULT_FFN_CONV_KERNEL_SIZE)),
            use_rope=bool(dit.get("use_rope", _DEFAULT_USE_ROPE)),
            rope_max_position_embeddings=int(rope.get("max_position_embeddings",
                                                      _DEFAULT_ROPE_MAX_POSITION_EMBEDDINGS)),
            rope_base=float(rope.get("rope_base", _DEFAULT_ROPE_BASE)),
            rope_interpolation_factor=float(rope.get("rope_interpolation_factor",
                                                     _DEFAULT_ROPE_INTERPOLATION_FACTOR)),
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The official ``config.yaml`` structure (``model.dit`` section + top-level mel normalisation)."""
        return {
            "model": {
                "dit": {
                    "input_size": self.input_size,
                    "semantic_vocab_size": self.semantic_vocab_size,
                    "hidden_size": self.hidden_size,
                    "depth": self.depth,
                    "num_heads": self.num_heads,
                    "mlp_ratio": self.mlp_ratio,
                    "ffn_type": self.ffn_type,
                    "ffn_gated_glu": self.ffn_gated_glu,
                    "ffn_act_layer": self.ffn_act_layer,
                    "ffn_conv_kernel_size": self.ffn_conv_kernel_size,
                    "use_rope": self.use_rope,
                    "rope_params": {
                        "max_position_embeddings": self.rope_max_position_embeddings,
                        "rope_base": self.rope_base,
                        "rope_interpolation_factor": self.rope_interpolation_factor,
                    },
                    "position_embedding_type": self.position_embedding_type,
                    "max_seq_len": self.max_seq_len,
                }
            },
            "normalize_mel": self.normalize_mel,
            "mel_mean": self.mel_mean,
            "mel_std": self.mel_std,
        }

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of ``semantic_token_embedding``: semantic_vocab_size + 1 (CFG id, added by the loader)."""
        return self.semantic_vocab_size + 1

    @property
    def cfg_token_id(self) -> int:
        """The classifier-free-guidance null id (= semantic_vocab_size); never fed by kimia.py (use_cfg=False)."""
        return self.semantic_vocab_size

    @property
    def mlp_hidden_size(self) -> int:
        """timm Mlp hidden width: int(hidden_size * mlp_ratio) (dit_block.py)."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def output_size(self) -> int:
        """Velocity channels: the loader passes output_size = input_size."""
        return self.input_size

    @property
    def max_positions(self) -> int:
        """Highest usable position id + 1. RoPE: the table has min(max_position_embeddings, max_seq_len) rows
        (precompute_freqs_cis truncates to max_seq_length); learnable: max_seq_len + 1 rows."""
        limits = []
        if self.use_rope:
            limits.append(min(self.rope_max_position_embeddings, self.max_seq_len))
        if self.position_embedding_type == "learnable":
            limits.append(self.max_seq_len + 1)
        # Neither: positions are not looked up anywhere; max_seq_len is the model's stated limit.
        return min(limits) if limits else self.max_seq_len

    # ---- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the field when the fields do not fit together."""
        for name in ("input_size", "semantic_vocab_size", "hidden_size", "depth", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.mlp_hidden_size <= 0:
            raise ValueError(f"mlp_ratio: expected > 0 (and int(hidden_size*mlp_ratio) >= 1), got {self.mlp_ratio}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_size {self.hidden_size}, got {self.num_heads}")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type: expected one of {FFN_TYPES}, got {self.ffn_type!r}")
        if self.ffn_type != SUPPORTED_FFN_TYPE:
            raise ValueError(f"ffn_type: the official DiTBlock implements only {SUPPORTED_FFN_TYPE!r} "
                             f"(any other value raises NotImplementedError there), got {self.ffn_type!r}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type: expected one of {POSITION_EMBEDDING_TYPES}, "
                             f"got {self.position_embedding_type!r}")
        if self.use_rope:
            if self.head_dim % 2:
                raise ValueError(f"num_heads: RoPE needs an even head_dim, got head_dim {self.head_dim}")
            if self.rope_max_position_embeddings <= 0:
                raise ValueError(f"rope_max_position_embeddings: expected > 0, got {self.rope_max_position_embeddings}")
            if self.rope_base <= 0:
                raise ValueError(f"rope_base: expected > 0, got {self.rope_base}")
            if self.rope_interpolation_factor <= 0:
                raise ValueError(f"rope_interpolation_factor: expected > 0, got {self.rope_interpolation_factor}")
        if self.normalize_mel:
            if self.mel_mean is None:
                raise ValueError("mel_mean: expected a number when normalize_mel is true, got None")
            if self.mel_std is None or self.mel_std <= 0:
                raise ValueError(f"mel_std: expected > 0 when normalize_mel is true, got {self.mel_std}")
