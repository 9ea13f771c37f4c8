"""The audio tokenizer at run time (torch-free): 16 kHz speech -> ``AudioEncoding`` = GLM-4-Voice semantic ids
[N] at 12.5 Hz + raw Whisper features [N, 4·d_whisper], from ONNX sessions of the two encoder graphs
(export/graphs/whisper_encoder.py, vq_encoder.py) and the fp32 codebook. Same semantics as the reference
``GoldenPipeline.encode_audio`` (official ``extract_speech_token`` + ``KimiAPromptManager.extract_whisper_feat``):

- ids: the clip is cut in 30 s segments; segments are batched by up to 128 and every segment of a batch is
  right-padded to the batch's longest one rounded up to 1280 samples (``WhisperFeatureExtractor(padding=
  "longest", pad_to_multiple_of=1280)``); per row: log-mel (max − 8 floor over the row), the VQ graph on
  (mel, frame mask) -> pooled pre-VQ states [T/8, d]; nearest codebook row in fp32; the ids at
  ``mask[::2][::pool]`` are kept, in order. The graph runs one row at a time (batch 1): rows are independent.
- features: each 30 s segment padded/trimmed to 480 000 samples, log-mel, the Whisper graph -> [1500, d]; the
  first 4·N frames (N = ceil(samples / 1280)) of each segment are concatenated and reshaped to [N, 4·d]
  (feature t = frames 4t .. 4t+3).

The codebook distance is here, not in the VQ graph, so that no fp16 / int8 variant of the graph can touch it
(reasons in export/graphs/vq_encoder.py). The features stay raw (before the LLM's VQ adaptor): the LLM backend
owns the adaptor (llama.cpp backend: numpy, weights from its adaptor GGUF); ``adapt`` runs the exported
adaptor graph instead, for backends that take adapted embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_encoder_config import CONV1_STRIDE, CONV2_STRIDE, VQEncoderConfig, WhisperEncoderConfig
from kimia_edge.runtime.prompt import AudioEncoding
from kimia_edge.runtime.sessions import Session
from kimia_edge.runtime.spec.graphs import VQ_CODEBOOK

__all__ = [
    "OnnxAudioTokenizer",
    "vq_segment_inputs",
    "nearest_codebook_rows",
    "kept_positions",
    "FRAMES_PER_FEATURE",
    "MAX_BATCH_SEGMENTS",
]

# 50 Hz Whisper frames per 12.5 Hz feature row: KimiAPromptManager.extract_whisper_feat reshapes [4N, d] -> [N, 4d]
# (and WhisperEncoder.tokenize_waveform keeps 4 * token_len frames per segment).
FRAMES_PER_FEATURE = 4
# GLM-4-Voice extract_speech_token runs at most 128 segments per batch (utils.py batch_size); padding is per batch.
MAX_BATCH_SEGMENTS = 128
_CONV_STRIDE = CONV1_STRIDE * CONV2_STRIDE


def vq_segment_inputs(segments: Sequence[np.ndarray], cfg: VQEncoderConfig) -> List[Tuple[np.ndarray, np.ndarray]]:
    """One official feature-extractor batch: segments [S_i] (16 kHz) -> per segment (mel [n_mels, T] float32,
    frame mask [T] int32), all rows padded to the longest segment rounded up to ``cfg.samples_per_token``."""
    feats = cfg.features
    padded, sample_mask = fe.pad_batch_longest(list(segments), cfg.samples_per_token, feats.padding_value)
    frame_mask = np.ascontiguousarray(sample_mask[:, :: feats.hop_length], dtype=np.int32)
    return [
        (fe.log_mel(row, feats.feature_size, n_fft=feats.n_fft, hop_length=feats.hop_length), mask)
        for row, mask in zip(padded, frame_mask)
    ]


def kept_positions(frame_mask: np.ndarray, cfg: VQEncoderConfig) -> np.ndarray:
    """[T] frame mask (100 Hz) -> [T / (strides x pool)] bool: the output positions whose id is kept
    (``attention_mask[:, ::2][:, ::pool]`` in extract_speech_token)."""
    return np.asarray(frame_mask)[::_CONV_STRIDE][:: cfg.pool].astype(bool)


def nearest_codebook_rows(hidden: np.ndarray, codebook: np.ndarray, codebook_sq: Optional[np.ndarray] = None) -> np.ndarray:
    """Nearest codebook row by squared L2, in fp32: hidden [n, d], codebook [V, d] -> ids [n] int64.

    ``argmin(‖c‖² + ‖h‖² − 2 h·c)``, the official ``vector_quantize`` formula (‖h‖² does not change the argmin but
    is kept so that the fp32 rounding follows the official one); ties go to the lowest id, as ``torch.min``.
    ``codebook_sq`` ([V], ‖c‖²) may be passed precomputed."""
    h = np.ascontiguousarray(hidden, dtype=np.float32)
    c = np.ascontiguousarray(codebook, dtype=np.float32)
    if h.ndim != 2 or c.ndim != 2 or h.shape[1] != c.shape[1]:
        raise ValueError(f"expected hidden [n, d] and codebook [V, d], got {h.shape} and {c.shape}")
    c_sq = np.sum(c * c, axis=1) if codebook_sq is None else np.asarray(codebook_sq, dtype=np.float32)
    h_sq = np.sum(h * h, axis=1, keepdims=True)
    distances = (c_sq[None, :] + h_sq) - np.float32(2.0) * (h @ c.T)
    return np.argmin(distances, axis=1).astype(np.int64)


class OnnxAudioTokenizer:
    """``encode(samples_16k) -> AudioEncoding`` over the two encoder sessions and the codebook.

    vq: session of the vq_encoder graph (mel [1, n_mels, T], frame_mask [1, T] -> pre_vq [1, T/8, d]);
    whisper: session of the whisper_encoder graph (mel [1, 128, 3000] -> hidden [1, 1500, d]);
    codebook: [V, d] float32 (bundle artifact ``vq_codebook``); vq_config / whisper_config: the config dataclasses
    or their dicts as the manifest's model config holds them (``model["vq_encoder"]``, ``model["whisper_encoder"]``);
    adaptor: optional session of the adaptor graph (features [N, 4d] -> [N, hidden]).
    """

    def __init__(self, vq: Session, whisper: Session, codebook: np.ndarray,
                 vq_config: Union[VQEncoderConfig, Mapping[str, Any]],
                 whisper_config: Union[WhisperEncoderConfig, Mapping[str, Any]],
                 adaptor: Optional[Session] = None) -> None:
        if isinstance(vq_config, Mapping):
            vq_config = VQEncoderConfig.from_dict(vq_config, vq_config.get("features"))
        if isinstance(whisper_config, Mapping):
            whisper_config = WhisperEncoderConfig.from_dict(whisper_config)
        whisper_config.validate()
        vq_config.validate()
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        if codebook.shape != (vq_config.quantize_vocab_size, vq_config.d_model):
            raise ValueError(f"codebook: expected shape {(vq_config.quantize_vocab_size, vq_config.d_model)} "
                             f"(quantize_vocab_size, d_model), got {codebook.shape}")
        self.vq, self.whisper, self.adaptor = vq, whisper, adaptor
        self.vq_config, self.whisper_config = vq_config, whisper_config
        self.codebook = codebook
        self.codebook_sq = np.sum(codebook * codebook, axis=1)

    @classmethod
    def from_bundle(cls, root: Path, *, whisper_precision: str = "fp32", vq_precision: str = "fp32",
                    with_adaptor: bool = False, adaptor_precision: str = "fp32", device: str = "auto",
                    threads: Optional[int] = None, strict: bool = False) -> "OnnxAudioTokenizer":
        """Opens the encoder artifacts of the bundle at ``root`` (configs from its manifest)."""
        from kimia_edge.runtime.bundle import load_bundle
        from kimia_edge.runtime.sessions import open_session

        root = Path(root)
        manifest = load_bundle(root, verify=False)

        def session(name: str, precision: str) -> Session:
            return open_session(root, manifest.artifact(name, precision), device=device, threads=threads, strict=strict)

        return cls(
            vq=session("vq_encoder", vq_precision),
            whisper=session("whisper_encoder", whisper_precision),
            codebook=np.load(root / manifest.artifact(VQ_CODEBOOK).path, allow_pickle=False),
            vq_config=manifest.model.vq_encoder,
            whisper_config=manifest.model.whisper_encoder,
            adaptor=session("adaptor", adaptor_precision) if with_adaptor else None,
        )

    # ---- the two branches ---------------------------------------------------------------------------------------
    def pre_vq(self, mel: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        """One padded segment: mel [n_mels, T], frame mask [T] -> pooled pre-VQ states [T/8, d] float32."""
        (pooled,) = self.vq.run({"mel": np.ascontiguousarray(mel[None], dtype=np.float32),
                                 "frame_mask": np.ascontiguousarray(frame_mask[None], dtype=np.int32)})
        return pooled[0]

    def semantic_ids(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [sum over segments of ceil(len / 1280)] int64 codebook ids (no kimia_token_offset)."""
        segments = fe.segment_30s(_check_samples(samples_16k))
        ids: List[np.ndarray] = []
        for start in range(0, len(segments), MAX_BATCH_SEGMENTS):
            for mel, mask in vq_segment_inputs(segments[start:start + MAX_BATCH_SEGMENTS], self.vq_config):
                keep = kept_positions(mask, self.vq_config)
                hidden = self.pre_vq(mel, mask)
                if hidden.shape[0] != keep.shape[0]:
                    raise ValueError(f"vq_encoder graph: expected {keep.shape[0]} output positions for {mask.shape[0]} "
                                     f"frames, got {hidden.shape[0]}")
                ids.append(nearest_codebook_rows(hidden[keep], self.codebook, self.codebook_sq))
        return np.concatenate(ids)

    def whisper_frames(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [4N, d] float32: the first 4·ceil(len / 1280) 50 Hz frames of each 30 s segment."""
        n_mels = self.whisper_config.num_mel_bins
        frames = []
        for segment in fe.segment_30s(_check_samples(samples_16k)):
            mel = fe.log_mel(fe.pad_or_trim(segment), n_mels)
            (hidden,) = self.whisper.run({"mel": np.ascontiguousarray(mel[None], dtype=np.float32)})
            frames.append(hidden[0, : fe.tokens_for_samples(segment.shape[0]) * FRAMES_PER_FEATURE])
        return np.concatenate(frames)

    def features(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [N, 4·d] float32 raw Whisper features at 12.5 Hz (row t = frames 4t .. 4t+3)."""
        frames = self.whisper_frames(samples_16k)
        return frames.reshape(frames.shape[0] // FRAMES_PER_FEATURE, frames.shape[1] * FRAMES_PER_FEATURE)

    def encode(self, samples_16k: np.ndarray) -> AudioEncoding:
        """[S] float32 mono 16 kHz -> AudioEncoding(semantic_ids [N] int64, features [N, 4·d] float32)."""
        samples = _check_samples(samples_16k)
        return AudioEncoding(semantic_ids=self.semantic_ids(samples), features=self.features(samples))

    __call__ = encode

    # ---- optional: the LLM's VQ adaptor as a graph --------------------------------------------------------------
    def adapt(self, features: np.ndarray) -> np.ndarray:
        """Raw features [N, 4·d] -> adapted [N, hidden] through the adaptor graph (needs ``adaptor``)."""
        if self.adaptor is None:
            raise ValueError("adapt: this tokenizer was built without an adaptor session (with_adaptor=False)")
        (out,) = self.adaptor.run({"features": np.ascontiguousarray(features, dtype=np.float32)})
        return out


def _check_samples(samples_16k: np.ndarray) -> np.ndarray:
    x = np.asarray(samples_16k, dtype=np.float32)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"samples_16k: expected mono 16 kHz samples [S] with S > 0, got shape {x.shape}")
    return x
