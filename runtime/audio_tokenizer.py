"""The audio tokenizer's host logic, written once (torch-free): 16 kHz speech -> ``AudioEncoding`` = GLM-4-Voice
semantic ids [N] at 12.5 Hz + raw Whisper features [N, 4·d_whisper], around two injected networks:

- ``VQIdsFn``: (mel [B, n_mels, T] float32, frame mask [B, T] int32) -> ids [B, T / 8] int64 (only the positions
  of real audio are read);
- ``WhisperFn``: mel [1, 128, 3000] float32 -> last hidden state [1, 1500, d] float32.

The runtime plugs in ONNX sessions (``OnnxAudioTokenizer``: the vq_encoder graph + the fp32 codebook argmin here,
the whisper_encoder graph); the golden pipeline plugs in the PyTorch reference modules
(``export.reference.glm_vq.vq_ids_fn``, ``export.reference.whisper_encoder.whisper_fn``). The official-fixture tests
then prove this one host logic, and parity tests between the two pluggings prove the artifacts. Semantics are the
official ``extract_speech_token`` (GLM-4-Voice speech_tokenizer/utils.py) + ``KimiAPromptManager.extract_whisper_feat``
(Kimi-Audio whisper_Lv3/whisper.py ``tokenize_waveform``):

- ids (``semantic_ids``): each utterance is cut in 30 s segments; the segments of all utterances, in order, are
  batched by up to 128 and every segment of a batch is right-padded to the batch's longest one rounded up to 1280
  samples (``WhisperFeatureExtractor(padding="longest", pad_to_multiple_of=1280)``: a segment's padding, hence
  the reflect padding of its last STFT frames, depends on its batch); per row: log-mel (max − 8 floor over the
  padded row) and the frame mask (sample mask[::160]); the network's ids at ``mask[::2][::pool]`` are kept, in
  order, and go back to their utterance.
- features (``whisper_frames`` / ``whisper_features``): each 30 s segment is padded/trimmed to 480 000 samples,
  log-mel, the Whisper network -> [1500, d]; the first 4·N frames (N = ceil(samples / 1280)) of each segment are
  concatenated and reshaped to [N, 4·d] (feature t = frames 4t .. 4t+3).

In ``OnnxAudioTokenizer`` the codebook distance is on the host, not in the VQ graph, so that no fp16 / int8 variant
of the graph can touch it (reasons in export/graphs/vq_encoder.py). The features stay raw (before the LLM's VQ
adaptor): the LLM backend owns the adaptor (llama.cpp backend: numpy, weights from its adaptor GGUF); ``adapt``
runs the exported adaptor graph instead, for backends that take adapted embeddings.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from kimia_edge.runtime import frontend as fe
from kimia_edge.runtime.audio_encoder_config import CONV1_STRIDE, CONV2_STRIDE, VQEncoderConfig, WhisperEncoderConfig
from kimia_edge.runtime.prompt import AudioEncoding
from kimia_edge.runtime.sessions import Session
from kimia_edge.runtime.spec.graphs import VQ_CODEBOOK

__all__ = [
    "AudioTokenizer",
    "OnnxAudioTokenizer",
    "VQIdsFn",
    "WhisperFn",
    "semantic_ids",
    "whisper_frames",
    "whisper_features",
    "vq_batch_inputs",
    "vq_segment_inputs",
    "nearest_codebook_rows",
    "kept_positions",
    "FRAMES_PER_FEATURE",
    "MAX_BATCH_SEGMENTS",
]

# (mel [B, n_mels, T] float32 at 100 Hz, frame_mask [B, T] int32, 1 = real audio) -> ids [B, T / frames_per_token]
# int64. Rows are independent; B <= the batch size. Only the kept positions (``kept_positions``) are read: ids at
# padding positions may be anything.
VQIdsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# mel [1, n_mels, n_input_frames] float32 (one 30 s window) -> last hidden state [1, max_source_positions, d] float32.
WhisperFn = Callable[[np.ndarray], np.ndarray]

# 50 Hz Whisper frames per 12.5 Hz feature row: KimiAPromptManager.extract_whisper_feat reshapes [4N, d] -> [N, 4d]
# (and WhisperEncoder.tokenize_waveform keeps 4 * token_len frames per segment).
FRAMES_PER_FEATURE = 4
# GLM-4-Voice extract_speech_token runs at most 128 segments per batch (utils.py batch_size); padding is per batch.
MAX_BATCH_SEGMENTS = 128
_CONV_STRIDE = CONV1_STRIDE * CONV2_STRIDE


# ---- VQ branch: segments -> padded batch -> ids at the kept positions ----------------------------------------------
def vq_batch_inputs(segments: Sequence[np.ndarray], cfg: VQEncoderConfig) -> Tuple[np.ndarray, np.ndarray]:
    """One official feature-extractor batch: segments [S_i] (16 kHz) -> (mel [B, n_mels, T] float32, frame mask
    [B, T] int32), every row padded to the longest segment rounded up to ``cfg.samples_per_token`` samples
    (T = padded samples / hop); the log-mel floor (max − 8) is taken per padded row."""
    feats = cfg.features
    padded, sample_mask = fe.pad_batch_longest(list(segments), cfg.samples_per_token, feats.padding_value)
    frame_mask = np.ascontiguousarray(sample_mask[:, :: feats.hop_length], dtype=np.int32)
    mel = np.empty((padded.shape[0], feats.feature_size, frame_mask.shape[1]), dtype=np.float32)
    for i, row in enumerate(padded):
        mel[i] = fe.log_mel(row, feats.feature_size, n_fft=feats.n_fft, hop_length=feats.hop_length)
    return mel, frame_mask


def vq_segment_inputs(segments: Sequence[np.ndarray], cfg: VQEncoderConfig) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``vq_batch_inputs`` as one (mel [n_mels, T], frame mask [T]) pair per segment (views of the batch)."""
    mel, frame_mask = vq_batch_inputs(segments, cfg)
    return list(zip(mel, frame_mask))


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


def semantic_ids(vq: VQIdsFn, utterances: Sequence[np.ndarray], cfg: VQEncoderConfig,
                 batch_size: int = MAX_BATCH_SEGMENTS) -> List[np.ndarray]:
    """``extract_speech_token``: 16 kHz mono utterances [S_i] -> one int64 id array per utterance, of length
    sum over its 30 s segments of ceil(len / 1280) (no kimia_token_offset; an empty utterance gives no ids).

    The segments of all utterances are batched together, ``batch_size`` at a time (the official 128); padding is
    per batch (module docstring), so batching changes the ids of a segment's last positions exactly as the official
    extractor does."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected > 0, got {batch_size}")
    segments: List[np.ndarray] = []
    owners: List[int] = []
    for idx, audio in enumerate(utterances):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"utterances[{idx}]: expected mono samples [S], got shape {audio.shape}")
        for segment in fe.segment_30s(audio):
            segments.append(segment)
            owners.append(idx)
    parts: List[List[np.ndarray]] = [[] for _ in utterances]
    for start in range(0, len(segments), batch_size):
        mel, frame_mask = vq_batch_inputs(segments[start:start + batch_size], cfg)
        ids = np.asarray(vq(mel, frame_mask))
        expected = (mel.shape[0], mel.shape[2] // cfg.frames_per_token)
        if ids.shape != expected:
            raise ValueError(f"vq encoder: expected ids of shape {expected} for mel {mel.shape}, got {ids.shape}")
        for i, row_ids in enumerate(ids):
            parts[owners[start + i]].append(row_ids[kept_positions(frame_mask[i], cfg)].astype(np.int64))
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


# ---- Whisper branch: 30 s windows -> first 4·N frames -> [N, 4d] --------------------------------------------------
def whisper_frames(whisper: WhisperFn, samples_16k: np.ndarray, cfg: WhisperEncoderConfig) -> np.ndarray:
    """``WhisperEncoder.tokenize_waveform``: [S] 16 kHz -> [4N, d] float32, the first 4·ceil(len / 1280) 50 Hz
    frames of each 30 s segment, concatenated (S > 0)."""
    frames = []
    for segment in fe.segment_30s(_check_samples(samples_16k)):
        mel = fe.log_mel(fe.pad_or_trim(segment), cfg.num_mel_bins)
        hidden = np.asarray(whisper(np.ascontiguousarray(mel[None], dtype=np.float32)))
        keep = fe.tokens_for_samples(segment.shape[0]) * FRAMES_PER_FEATURE
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < keep or hidden.shape[2] != cfg.d_model:
            raise ValueError(f"whisper encoder: expected hidden [1, >= {keep}, {cfg.d_model}], got {hidden.shape}")
        frames.append(hidden[0, :keep].astype(np.float32, copy=False))
    return np.concatenate(frames)


def whisper_features(whisper: WhisperFn, samples_16k: np.ndarray, cfg: WhisperEncoderConfig) -> np.ndarray:
    """``KimiAPromptManager.extract_whisper_feat``: [S] 16 kHz -> [N, 4·d] float32 raw features at 12.5 Hz, a pure
    reshape of ``whisper_frames`` (row t = frames 4t .. 4t+3)."""
    frames = whisper_frames(whisper, samples_16k, cfg)
    return frames.reshape(frames.shape[0] // FRAMES_PER_FEATURE, frames.shape[1] * FRAMES_PER_FEATURE)


class AudioTokenizer:
    """``encode(samples_16k) -> AudioEncoding`` over two injected networks (``VQIdsFn``, ``WhisperFn``) and the
    configs of the encoders they run (``VQEncoderConfig``, ``WhisperEncoderConfig``)."""

    def __init__(self, vq_ids: VQIdsFn, whisper: WhisperFn, vq_config: VQEncoderConfig,
                 whisper_config: WhisperEncoderConfig) -> None:
        vq_config.validate()
        whisper_config.validate()
        self._vq_ids, self._whisper = vq_ids, whisper
        self.vq_config, self.whisper_config = vq_config, whisper_config

    def semantic_ids(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [sum over segments of ceil(len / 1280)] int64 codebook ids (no kimia_token_offset)."""
        return semantic_ids(self._vq_ids, [_check_samples(samples_16k)], self.vq_config)[0]

    def whisper_frames(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [4N, d] float32: the first 4·ceil(len / 1280) 50 Hz frames of each 30 s segment."""
        return whisper_frames(self._whisper, samples_16k, self.whisper_config)

    def features(self, samples_16k: np.ndarray) -> np.ndarray:
        """[S] 16 kHz -> [N, 4·d] float32 raw Whisper features at 12.5 Hz (row t = frames 4t .. 4t+3)."""
        return whisper_features(self._whisper, samples_16k, self.whisper_config)

    def encode(self, samples_16k: np.ndarray) -> AudioEncoding:
        """[S] float32 mono 16 kHz -> AudioEncoding(semantic_ids [N] int64, features [N, 4·d] float32)."""
        samples = _check_samples(samples_16k)
        return AudioEncoding(semantic_ids=self.semantic_ids(samples), features=self.features(samples))

    __call__ = encode


def _weak_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` as a callable that does not keep its object alive. An object that stores its own bound methods is
    a reference cycle: freed only by the garbage collector, whenever that runs, instead of when its last user lets
    go (low-memory mode's encoder sessions outlived the turn's encoding and stood beside the DiT's)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        return ref()(*args)  # type: ignore[misc]  # the object is alive while it runs its own encode

    return call


class OnnxAudioTokenizer(AudioTokenizer):
    """``AudioTokenizer`` over the two encoder sessions and the codebook.

    vq: session of the vq_encoder graph (mel [1, n_mels, T], frame_mask [1, T] -> pre_vq [1, T/8, d]), run one row
    at a time, then the nearest codebook row in fp32 here (``nearest_codebook_rows``);
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
        # weak: the sessions are freed as soon as the tokenizer is dropped, with no reference cycle to wait on
        super().__init__(_weak_method(self._graph_ids), _weak_method(self._graph_hidden), vq_config, whisper_config)
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        if codebook.shape != (vq_config.quantize_vocab_size, vq_config.d_model):
            raise ValueError(f"codebook: expected shape {(vq_config.quantize_vocab_size, vq_config.d_model)} "
                             f"(quantize_vocab_size, d_model), got {codebook.shape}")
        self.vq, self.whisper, self.adaptor = vq, whisper, adaptor
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

    # ---- the two networks, as the host logic wants them -------------------------------------------------------------
    def pre_vq(self, mel: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        """One padded segment: mel [n_mels, T], frame mask [T] -> pooled pre-VQ states [T/8, d] float32."""
        (pooled,) = self.vq.run({"mel": np.ascontiguousarray(mel[None], dtype=np.float32),
                                 "frame_mask": np.ascontiguousarray(frame_mask[None], dtype=np.int32)})
        return pooled[0]

    def _graph_ids(self, mel: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        """``VQIdsFn``: the graph row by row (rows are independent), then the fp32 codebook argmin at the kept
        positions only (the host reads no other; padding positions are left 0, which saves the search there)."""
        ids = np.zeros((mel.shape[0], mel.shape[2] // self.vq_config.frames_per_token), dtype=np.int64)
        for i, (row_mel, row_mask) in enumerate(zip(mel, frame_mask)):
            pooled = self.pre_vq(row_mel, row_mask)
            if pooled.shape[0] != ids.shape[1]:
                raise ValueError(f"vq_encoder graph: expected {ids.shape[1]} output positions for {mel.shape[2]} "
                                 f"frames, got {pooled.shape[0]}")
            keep = kept_positions(row_mask, self.vq_config)
            ids[i, keep] = nearest_codebook_rows(pooled[keep], self.codebook, self.codebook_sq)
        return ids

    def _graph_hidden(self, mel: np.ndarray) -> np.ndarray:
        """``WhisperFn``: mel [1, 128, 3000] -> hidden [1, 1500, d] through the whisper_encoder graph."""
        (hidden,) = self.whisper.run({"mel": np.ascontiguousarray(mel, dtype=np.float32)})
        return hidden

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
