"""BigVGAN vocoder hyper-parameters, read from the snapshot's ``vocoder/config.json`` (torch-free).

The official file is the BigVGAN ``AttrDict`` JSON (training fields such as ``learning_rate`` included); only the
fields the generator and the mel front end use are kept here, everything else is ignored. Defaults exist only where
the official code has one (``h.get(..., default)`` in BigVGAN ``bigvgan.py``); every other field is required.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

from .config_parse import malformed_is_value_error, read_json_object

__all__ = ["VocoderConfig", "RESBLOCK_TYPES", "ACTIVATIONS"]

# Residual block classes selectable by ``resblock`` (BigVGAN bigvgan.py: "1" -> AMPBlock1, "2" -> AMPBlock2).
RESBLOCK_TYPES = ("1", "2")
# Periodic activations selectable by ``activation`` (BigVGAN activations.py: Snake, SnakeBeta).
ACTIVATIONS = ("snake", "snakebeta")

# Official defaults when the key is absent: ``h.get("use_tanh_at_final", True)``, ``h.get("use_bias_at_final", True)``
# ("for backward compatibility", BigVGAN bigvgan.py).
_DEFAULT_USE_TANH_AT_FINAL = True
_DEFAULT_USE_BIAS_AT_FINAL = True

_REQUIRED = (
    "resblock",
    "upsample_rates",
    "upsample_kernel_sizes",
    "upsample_initial_channel",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "activation",
    "snake_logscale",
    "num_mels",
    "sampling_rate",
    "hop_size",
)


@dataclass(frozen=True)
class VocoderConfig:
    """BigVGAN generator configuration.

    Lengths: one mel frame becomes ``hop_size`` samples at ``sampling_rate`` Hz; ``prod(upsample_rates)`` must equal
    ``hop_size``. Channel width after up-sampling stage ``i`` is ``upsample_initial_channel // 2**(i+1)``.
    ``n_fft`` / ``win_size`` / ``fmin`` / ``fmax`` only matter for mel extraction from audio (voice prompts), which
    kimia.py does not use; they are optional and ``None`` when absent (``fmax`` null means sampling_rate / 2).
    """

    resblock: str
    upsample_rates: Tuple[int, ...]
    upsample_kernel_sizes: Tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: Tuple[int, ...]
    resblock_dilation_sizes: Tuple[Tuple[int, ...], ...]
    activation: str
    snake_logscale: bool
    num_mels: int
    sampling_rate: int
    hop_size: int
    use_tanh_at_final: bool = _DEFAULT_USE_TANH_AT_FINAL
    use_bias_at_final: bool = _DEFAULT_USE_BIAS_AT_FINAL
    n_fft: Optional[int] = None
    win_size: Optional[int] = None
    fmin: Optional[float] = None
    fmax: Optional[float] = None

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    @malformed_is_value_error
    def from_dict(cls, data: Mapping[str, Any]) -> "VocoderConfig":
        """Builds and validates a config from the parsed official JSON; unknown (training) keys are ignored."""
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"vocoder config: missing required field(s) {missing}")
        cfg = cls(
            resblock=str(data["resblock"]),
            upsample_rates=tuple(int(u) for u in data["upsample_rates"]),
            upsample_kernel_sizes=tuple(int(k) for k in data["upsample_kernel_sizes"]),
            upsample_initial_channel=int(data["upsample_initial_channel"]),
            resblock_kernel_sizes=tuple(int(k) for k in data["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in data["resblock_dilation_sizes"]),
            activation=str(data["activation"]),
            snake_logscale=bool(data["snake_logscale"]),
            num_mels=int(data["num_mels"]),
            sampling_rate=int(data["sampling_rate"]),
            hop_size=int(data["hop_size"]),
            use_tanh_at_final=bool(data.get("use_tanh_at_final", _DEFAULT_USE_TANH_AT_FINAL)),
            use_bias_at_final=bool(data.get("use_bias_at_final", _DEFAULT_USE_BIAS_AT_FINAL)),
            n_fft=_opt_int(data.get("n_fft")),
            win_size=_opt_int(data.get("win_size")),
            fmin=_opt_float(data.get("fmin")),
            fmax=_opt_float(data.get("fmax")),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "VocoderConfig":
        """Reads the official ``vocoder/config.json``."""
        path = Path(path)
        data = read_json_object(path)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        """The fields in the official JSON spelling (lists, optional fields omitted when ``None``)."""
        out: dict = {}
        for key, value in asdict(self).items():
            if value is None and key in ("n_fft", "win_size", "fmin", "fmax"):
                continue
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        return out

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def num_upsamples(self) -> int:
        return len(self.upsample_rates)

    @property
    def num_kernels(self) -> int:
        """Residual blocks per up-sampling stage (their outputs are averaged)."""
        return len(self.resblock_kernel_sizes)

    @property
    def frame_rate_hz(self) -> float:
        """Mel frames per second (50.0 for Kimi-Audio: 24 000 / 480)."""
        return self.sampling_rate / self.hop_size

    def stage_channels(self, stage: int) -> int:
        """Channels after up-sampling stage ``stage`` (0-based); ``stage=-1`` is the pre-conv width."""
        return self.upsample_initial_channel // (2 ** (stage + 1))

    # ---- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the field when the fields do not fit together."""
        if self.resblock not in RESBLOCK_TYPES:
            raise ValueError(f"resblock: expected one of {RESBLOCK_TYPES}, got {self.resblock!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("upsample_initial_channel", "num_mels", "sampling_rate", "hop_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if not self.upsample_rates:
            raise ValueError("upsample_rates: expected at least one stage, got []")
        if len(self.upsample_kernel_sizes) != len(self.upsample_rates):
            raise ValueError(
                f"upsample_kernel_sizes: expected {len(self.upsample_rates)} entries (one per upsample_rates entry), "
                f"got {len(self.upsample_kernel_sizes)}"
            )
        for i, (u, k) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            if u <= 0:
                raise ValueError(f"upsample_rates[{i}]: expected > 0, got {u}")
            # ConvTranspose1d(k, stride u, padding (k-u)//2) yields exactly T*u samples only if k >= u and k-u is even.
            if k < u or (k - u) % 2:
                raise ValueError(
                    f"upsample_kernel_sizes[{i}]: expected k >= u and (k - u) even for u={u}, got k={k}"
                )
        if math.prod(self.upsample_rates) != self.hop_size:
            raise ValueError(
                f"upsample_rates: expected product == hop_size {self.hop_size}, "
                f"got {list(self.upsample_rates)} (product {math.prod(self.upsample_rates)})"
            )
        if self.stage_channels(self.num_upsamples - 1) < 1:
            raise ValueError(
                f"upsample_initial_channel: {self.upsample_initial_channel} halved {self.num_upsamples} times "
                f"leaves no channel; expected >= {2 ** self.num_upsamples}"
            )
        if not self.resblock_kernel_sizes:
            raise ValueError("resblock_kernel_sizes: expected at least one kernel size, got []")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise ValueError(
                f"resblock_dilation_sizes: expected {len(self.resblock_kernel_sizes)} lists "
                f"(one per resblock_kernel_sizes entry), got {len(self.resblock_dilation_sizes)}"
            )
        for i, k in enumerate(self.resblock_kernel_sizes):
            # "same" padding (k*d - d)/2 keeps the length only for odd kernels.
            if k <= 0 or k % 2 == 0:
                raise ValueError(f"resblock_kernel_sizes[{i}]: expected an odd positive size, got {k}")
        for i, ds in enumerate(self.resblock_dilation_sizes):
            if not ds or any(d <= 0 for d in ds):
                raise ValueError(f"resblock_dilation_sizes[{i}]: expected positive dilations, got {list(ds)}")


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _opt_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)
