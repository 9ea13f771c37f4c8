"""Configurations of the two audio encoders and of the Whisper feature extractor (torch-free).

- ``WhisperEncoderConfig``: the Kimi snapshot's ``whisper-large-v3/config.json`` (HF ``WhisperConfig``); only the
  encoder fields are kept (Kimi uses ``WhisperModel(...).encoder``, kimia_infer/models/tokenizer/whisper_Lv3).
- ``VQEncoderConfig``: ``THUDM/glm-4-voice-tokenizer/config.json`` (GLM-4-Voice ``WhisperVQConfig``,
  speech_tokenizer/configuration_whisper.py) plus its ``preprocessor_config.json`` (``FeatureExtractorConfig``,
  read by ``WhisperFeatureExtractor.from_pretrained`` in kimia_infer/models/tokenizer/glm4_tokenizer.py).

Defaults are the official class defaults (``WhisperConfig.__init__`` of transformers, ``WhisperVQConfig.__init__``,
``WhisperFeatureExtractor.__init__``) and apply only when the file lacks the key, as ``from_pretrained`` does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config_parse import malformed_is_value_error, read_json_object

__all__ = [
    "FeatureExtractorConfig",
    "WhisperEncoderConfig",
    "VQEncoderConfig",
    "LAYER_NORM_EPS",
    "KIMI_WHISPER_NUM_MEL_BINS",
    "CONV1_STRIDE",
    "CONV2_STRIDE",
    "CONV_KERNEL_SIZE",
    "POOLING_TYPES",
    "ACTIVATIONS",
]

CONFIG_FILE = "config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"

# nn.LayerNorm(embed_dim) with the torch default eps (both modeling_whisper.py files; WhisperConfig has no eps field).
LAYER_NORM_EPS = 1e-5
# Kimi's WhisperEncoder hard-codes ``self.num_mel_bins = 128`` (whisper_Lv3/modeling_whisper.py), ignoring config.
KIMI_WHISPER_NUM_MEL_BINS = 128
# conv1 (kernel 3, stride 1) and conv2 (kernel 3, stride 2) of both encoders (modeling_whisper.py).
CONV_KERNEL_SIZE = 3
CONV1_STRIDE = 1
CONV2_STRIDE = 2
# WhisperVQEncoder.init_pooling_layer: "max" -> MaxPool1d, "avg" -> AvgPool1d.
POOLING_TYPES = ("max", "avg")
# transformers ACT2FN names the encoders may use for the FFN (the convs always use exact GELU).
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# transformers WhisperConfig.__init__ defaults (whisper-tiny dims), used only for keys absent from config.json.
_WHISPER_DEFAULTS = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "activation_function": "gelu",
    "scale_embedding": False,
}

# WhisperFeatureExtractor.__init__ defaults.
_FE_DEFAULTS = {
    "feature_size": 80,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "padding_value": 0.0,
}

# WhisperVQConfig.__init__ defaults (GLM-4-Voice speech_tokenizer/configuration_whisper.py).
_VQ_DEFAULTS = {
    "pooling_kernel_size": None,
    "pooling_type": "max",
    "pooling_position": 0,
    "quantize_vocab_size": None,
    "quantize_position": 16,
    "quantize_ema_decay": None,
    "quantize_encoder_only": False,
    "quantize_causal_encoder": False,
    "quantize_causal_block_size": None,
    "encoder_causal_attention": False,
    "encoder_causal_convolution": False,
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"expected {path}, not found")
    return read_json_object(path)


def _get(data: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    return data[key] if key in data else defaults[key]


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _check_positive(obj: object, names: tuple) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """``preprocessor_config.json`` of a ``WhisperFeatureExtractor``: ``feature_size`` mel bins at
    ``sampling_rate / hop_length`` Hz (100 Hz), ``n_fft``-point STFT, ``chunk_length`` s segments."""

    feature_size: int = _FE_DEFAULTS["feature_size"]
    sampling_rate: int = _FE_DEFAULTS["sampling_rate"]
    hop_length: int = _FE_DEFAULTS["hop_length"]
    chunk_length: int = _FE_DEFAULTS["chunk_length"]
    n_fft: int = _FE_DEFAULTS["n_fft"]
    padding_value: float = _FE_DEFAULTS["padding_value"]

    @property
    def n_samples(self) -> int:
        """Samples per ``chunk_length`` segment (WhisperFeatureExtractor.n_samples)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Mel frames per padded segment (WhisperFeatureExtractor.nb_max_frames)."""
        return self.n_samples // self.hop_length

    @classmethod
    @malformed_is_value_error
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureExtractorConfig":
        """From the parsed JSON; absent keys take the WhisperFeatureExtractor defaults, unknown keys are ignored.
        ``n_samples`` / ``nb_max_frames`` are derived (as the official class does) and checked if present."""
        cfg = cls(
            feature_size=int(_get(data, _FE_DEFAULTS, "feature_size")),
            sampling_rate=int(_get(data, _FE_DEFAULTS, "sampling_rate")),
            hop_length=int(_get(data, _FE_DEFAULTS, "hop_length")),
            chunk_length=int(_get(data, _FE_DEFAULTS, "chunk_length")),
            n_fft=int(_get(data, _FE_DEFAULTS, "n_fft")),
            padding_value=float(_get(data, _FE_DEFAULTS, "padding_value")),
        )
        cfg.validate()
        for key, derived in (("n_samples", cfg.n_samples), ("nb_max_frames", cfg.nb_max_frames)):
            if key in data and int(data[key]) != derived:
                raise ValueError(f"FeatureExtractorConfig.{key}: expected {derived} (derived), got {data[key]}")
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "FeatureExtractorConfig":
        path = Path(path)
        try:
            return cls.from_dict(_read_json(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        """The official JSON fields (as ``save_pretrained`` writes them)."""
        out = asdict(self)
        out.update(
            feature_extractor_type="WhisperFeatureExtractor",
            n_samples=self.n_samples,
            nb_max_frames=self.nb_max_frames,
            padding_side="right",
            return_attention_mask=False,
        )
        return out

    def validate(self) -> None:
        _check_positive(self, ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft"))
        if self.n_samples % self.hop_length:
            raise ValueError(f"FeatureExtractorConfig.hop_length: expected a divisor of {self.n_samples} samples, "
                             f"got {self.hop_length}")


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Whisper(-large-v3) encoder: ``num_mel_bins`` x 3000 frames (100 Hz) -> ``max_source_positions`` x ``d_model``
    (50 Hz) through conv1/conv2 (GELU), learned positions and ``encoder_layers`` pre-LN layers.

    ``scale_embedding`` is carried but unused: Kimi's encoder computes ``embed_scale`` and never applies it.
    """

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int = KIMI_WHISPER_NUM_MEL_BINS
    max_source_positions: int = _WHISPER_DEFAULTS["max_source_positions"]
    activation_function: str = _WHISPER_DEFAULTS["activation_function"]
    scale_embedding: bool = _WHISPER_DEFAULTS["scale_embedding"]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def n_input_frames(self) -> int:
        """Mel frames the encoder accepts: exactly conv2 stride x max_source_positions (3000 for large-v3)."""
        return self.max_source_positions * CONV1_STRIDE * CONV2_STRIDE

    @classmethod
    @malformed_is_value_error
    def from_dict(cls, data: Mapping[str, Any]) -> "WhisperEncoderConfig":
        """From the parsed HF ``config.json``; absent keys take the ``WhisperConfig`` defaults."""
        cfg = cls(
            d_model=int(_get(data, _WHISPER_DEFAULTS, "d_model")),
            encoder_layers=int(_get(data, _WHISPER_DEFAULTS, "encoder_layers")),
            encoder_attention_heads=int(_get(data, _WHISPER_DEFAULTS, "encoder_attention_heads")),
            encoder_ffn_dim=int(_get(data, _WHISPER_DEFAULTS, "encoder_ffn_dim")),
            num_mel_bins=int(_get(data, _WHISPER_DEFAULTS, "num_mel_bins")),
            max_source_positions=int(_get(data, _WHISPER_DEFAULTS, "max_source_positions")),
            activation_function=str(_get(data, _WHISPER_DEFAULTS, "activation_function")),
            scale_embedding=bool(_get(data, _WHISPER_DEFAULTS, "scale_embedding")),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "WhisperEncoderConfig":
        path = Path(path)
        try:
            return cls.from_dict(_read_json(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        _check_positive(self, ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                               "num_mel_bins", "max_source_positions"))
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"WhisperEncoderConfig.encoder_attention_heads: expected a divisor of d_model "
                             f"{self.d_model}, got {self.encoder_attention_heads}")
        if self.num_mel_bins != KIMI_WHISPER_NUM_MEL_BINS:
            raise ValueError(f"WhisperEncoderConfig.num_mel_bins: expected {KIMI_WHISPER_NUM_MEL_BINS} (hard-coded "
                             f"by Kimi's WhisperEncoder), got {self.num_mel_bins}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"WhisperEncoderConfig.activation_function: expected one of {ACTIVATIONS}, "
                             f"got {self.activation_function!r}")


@dataclass(frozen=True)
class VQEncoderConfig:
    """GLM-4-Voice ``WhisperVQEncoder``: mel [num_mel_bins, T] (100 Hz) -> conv1/conv2 (causal if
    ``encoder_causal_convolution``) -> 50 Hz -> layers (block-causal attention in blocks of
    ``quantize_causal_block_size`` frames) -> pooling x ``pooling_kernel_size`` after layer ``pooling_position`` ->
    nearest codebook row (``quantize_vocab_size`` rows) after layer ``quantize_position`` -> ids at 12.5 Hz.

    With ``quantize_encoder_only`` only layers ``0 .. quantize_position-1`` exist and there is no final layer norm.
    ``quantize_ema_decay`` not None means the checkpoint carries the ``ema_count`` / ``ema_weight`` buffers.
    """

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int = _WHISPER_DEFAULTS["max_source_positions"]
    activation_function: str = _WHISPER_DEFAULTS["activation_function"]
    scale_embedding: bool = _WHISPER_DEFAULTS["scale_embedding"]
    pooling_kernel_size: Optional[int] = _VQ_DEFAULTS["pooling_kernel_size"]
    pooling_type: str = _VQ_DEFAULTS["pooling_type"]
    pooling_position: int = _VQ_DEFAULTS["pooling_position"]
    quantize_vocab_size: Optional[int] = _VQ_DEFAULTS["quantize_vocab_size"]
    quantize_position: int = _VQ_DEFAULTS["quantize_position"]
    quantize_ema_decay: Optional[float] = _VQ_DEFAULTS["quantize_ema_decay"]
    quantize_encoder_only: bool = _VQ_DEFAULTS["quantize_encoder_only"]
    quantize_causal_encoder: bool = _VQ_DEFAULTS["quantize_causal_encoder"]
    quantize_causal_block_size: Optional[int] = _VQ_DEFAULTS["quantize_causal_block_size"]
    encoder_causal_attention: bool = _VQ_DEFAULTS["encoder_causal_attention"]
    encoder_causal_convolution: bool = _VQ_DEFAULTS["encoder_causal_convolution"]
    features: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def n_layers_built(self) -> int:
        """Layers that exist in the module and the checkpoint (``quantize_position`` when encoder-only)."""
        return self.quantize_position if self.quantize_encoder_only else self.encoder_layers

    @property
    def layers_causal(self) -> bool:
        """Plain causal attention (SDPA ``is_causal``, no padding mask) instead of the block-causal mask."""
        return self.encoder_causal_attention or self.quantize_causal_encoder

    @property
    def pool(self) -> int:
        """Pooling factor (1 without pooling; utils.py ``pooling_kernel_size or 1``)."""
        return self.pooling_kernel_size or 1

    @property
    def frames_per_token(self) -> int:
        """100 Hz mel frames per output id: conv strides x pooling (8 for GLM-4-Voice)."""
        return CONV1_STRIDE * CONV2_STRIDE * self.pool

    @property
    def samples_per_token(self) -> int:
        """16 kHz samples per output id: conv strides x pooling x hop (utils.py ``stride``; 1280 for GLM-4-Voice)."""
        return self.frames_per_token * self.features.hop_length

    @property
    def max_pooled_positions(self) -> int:
        """Rows of ``embed_positions2``: ceil(max_source_positions / pooling_kernel_size)."""
        return -(-self.max_source_positions // self.pool)

    @classmethod
    @malformed_is_value_error
    def from_dict(cls, data: Mapping[str, Any],
                  preprocessor: Optional[Mapping[str, Any]] = None) -> "VQEncoderConfig":
        """From the parsed ``config.json`` (and ``preprocessor_config.json``); absent keys take the
        ``WhisperVQConfig`` / ``WhisperConfig`` / ``WhisperFeatureExtractor`` defaults."""
        def pick(key: str) -> Any:
            return data[key] if key in data else (_VQ_DEFAULTS[key] if key in _VQ_DEFAULTS else _WHISPER_DEFAULTS[key])

        ema = pick("quantize_ema_decay")
        cfg = cls(
            d_model=int(pick("d_model")),
            encoder_layers=int(pick("encoder_layers")),
            encoder_attention_heads=int(pick("encoder_attention_heads")),
            encoder_ffn_dim=int(pick("encoder_ffn_dim")),
            num_mel_bins=int(pick("num_mel_bins")),
            max_source_positions=int(pick("max_source_positions")),
            activation_function=str(pick("activation_function")),
            scale_embedding=bool(pick("scale_embedding")),
            pooling_kernel_size=_opt_int(pick("pooling_kernel_size")),
            pooling_type=str(pick("pooling_type")),
            pooling_position=int(pick("pooling_position")) if pick("pooling_position") is not None else 0,
            quantize_vocab_size=_opt_int(pick("quantize_vocab_size")),
            quantize_position=int(pick("quantize_position")),
            quantize_ema_decay=None if ema is None else float(ema),
            quantize_encoder_only=bool(pick("quantize_encoder_only")),
            quantize_causal_encoder=bool(pick("quantize_causal_encoder")),
            quantize_causal_block_size=_opt_int(pick("quantize_causal_block_size")),
            encoder_causal_attention=bool(pick("encoder_causal_attention")),
            encoder_causal_convolution=bool(pick("encoder_causal_convolution")),
            features=FeatureExtractorConfig.from_dict(preprocessor or {}),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_folder(cls, folder: Union[str, Path]) -> "VQEncoderConfig":
        """Reads ``<folder>/config.json`` and ``<folder>/preprocessor_config.json`` (the tokenizer repo)."""
        folder = Path(folder)
        model_path, fe_path = folder / CONFIG_FILE, folder / PREPROCESSOR_CONFIG_FILE
        data, fe = _read_json(model_path), _read_json(fe_path)
        try:
            return cls.from_dict(data, fe)
        except ValueError as e:
            raise ValueError(f"{folder} ({CONFIG_FILE}, {PREPROCESSOR_CONFIG_FILE}): {e}") from e

    def to_dict(self) -> dict:
        """The model fields in the official ``config.json`` spelling (feature extractor excluded)."""
        out = asdict(self)
        out.pop("features")
        return out

    def validate(self) -> None:
        _check_positive(self, ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                               "num_mel_bins", "max_source_positions", "quantize_position"))
        name = type(self).__name__
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"{name}.encoder_attention_heads: expected a divisor of d_model {self.d_model}, "
                             f"got {self.encoder_attention_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"{name}.activation_function: expected one of {ACTIVATIONS}, "
                             f"got {self.activation_function!r}")
        if self.quantize_vocab_size is None or self.quantize_vocab_size <= 0:
            raise ValueError(f"{name}.quantize_vocab_size: expected a positive codebook size (the tokenizer needs a "
                             f"codebook), got {self.quantize_vocab_size!r}")
        if self.quantize_position > self.encoder_layers:
            raise ValueError(f"{name}.quantize_position: expected <= encoder_layers {self.encoder_layers}, "
                             f"got {self.quantize_position}")
        if self.pooling_kernel_size is not None:
            if self.pooling_kernel_size <= 0:
                raise ValueError(f"{name}.pooling_kernel_size: expected > 0 or null, got {self.pooling_kernel_size}")
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"{name}.pooling_type: expected one of {POOLING_TYPES}, got {self.pooling_type!r}")
            if not 1 <= self.pooling_position <= self.quantize_position:
                # WhisperVQEncoder asserts quantize_position >= pooling_position; position 0 would never pool.
                raise ValueError(f"{name}.pooling_position: expected 1..quantize_position ({self.quantize_position}),"
                                 f" got {self.pooling_position}")
        if self.quantize_causal_block_size is not None:
            # after pooling the block is quantize_causal_block_size // pooling_kernel_size (modeling_whisper.py)
            if self.quantize_causal_block_size < self.pool:
                raise ValueError(f"{name}.quantize_causal_block_size: expected >= the pooling factor {self.pool}, "
                                 f"got {self.quantize_causal_block_size}")
        if self.features.feature_size != self.num_mel_bins:
            raise ValueError(f"{name}.features.feature_size: expected num_mel_bins {self.num_mel_bins}, "
                             f"got {self.features.feature_size}")
