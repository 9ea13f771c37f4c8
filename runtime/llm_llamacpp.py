"""`LlamaCppBackend`: the dual-head Kimi-Audio LLM on llama.cpp (llama-cpp-python low-level API), torch-free.

Files (written by ``export/gguf_export.py``): ``llm_trunk.gguf`` (qwen2, all main layers + norm + lm_head),
``llm_audio.gguf`` (qwen2 with the MIMO layers; mimo_norm as output_norm, mimo_output as the tied head) and
``llm_adaptor.gguf`` (the continuous-feature adaptor, read with ``gguf.GGUFReader``). All hyper-parameters come from
the files' metadata (``kimia.*`` keys), so no snapshot is needed.

Per decode call (mechanism "A", chosen in bench/llm_mechanisms.py):
1. inputs_embeds are built here in numpy, exactly as the reference (reference §1.5): rows of ``token_embd`` read on
   demand from the memory-mapped trunk file (dequantized for quantized types), audio + text embeddings, adaptor(
   features) added and scaled by sqrt(2) at continuous positions, the text embedding skipped when the text ids sum
   to 0 (official quirk).
2. the trunk decodes them (``llama_batch.embd``); a ``cb_eval`` callback copies ``l_out-{fork}`` (the output of main
   layer ``fork``, [T, hidden]) to host memory; text logits come from the trunk's head. The callback is C++
   (``NativeHiddenCapture``: no Python per graph node) unless the Python one is asked for (:func:`make_capture`).
3. the audio model decodes the captured hidden states at the same positions; its logits are the audio logits.

Why A (one trunk file + cb_eval) and not B (trunk split at the fork into two files): a qwen2 GGUF's only output
is after output_norm, so B's first part still needs the same callback; measured per step (bench/llm_mechanisms.py,
small snapshot, 2 cores) A and B cost the same within 1 % (F16 30.6 vs 30.3 ms, Q4_K_M 17.3 vs 17.2 ms; the Python
callback itself costs ~0.3-0.5 ms/step). B only wins once the text stream has ended (it can skip layers fork+1..N-1;
18.5 vs 20.1 ms F16) but needs a third file with a dummy 1-row head, one more decode call per step, and a KV backfill
of the skipped text tail before the next turn. A keeps a stock, self-contained text model and skips only the
trunk's head when the text has ended (``step(..., need_text=False)``), and defers the audio model while its logits
are not needed (``need_audio=False``: text-only tasks never run it; rows waiting through the audio delay are
decoded in one batch when audio logits are first asked for).

Both models keep their own KV cache (sequence 0) in step. Exact-parity settings (flash attention off, F32 KV
cache) are the ``exact=True`` option. Both callbacks lean on the ggml ABI (``ggml_get_name``, ``ggml_nbytes``,
``ggml_nelements``, ``ggml_backend_tensor_get`` in libggml-base: the native one calls the same four functions
through addresses taken here with ctypes, and mirrors no struct layout) and on llama.cpp's tensor names
(``l_out-<il>``): pin the llama-cpp-python version (tested with 0.3.36).
"""
from __future__ import annotations

import ctypes
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

import gguf
import llama_cpp as llama

from .bundle import ArtifactOpenError, unopenable
from .llm_backend import StepLogits
from .spec.gguf import ADAPTOR_TENSORS, CONTEXT_LENGTH_KEY, KIMIA_KEYS

__all__ = ["LlamaCppBackend", "LlamaModel", "llama_log_capture", "HiddenCapture", "NativeHiddenCapture", "make_capture", "GGUFModelInfo", "read_model_info", "EmbeddingTable",
           "FeatureAdaptor",
           "LlamaCppError"]

log = logging.getLogger(__name__)

_GGML_TYPE_F32 = 0  # ggml_type enum value of F32 (ggml.h), used for the F32 KV cache of the exact mode


class LlamaCppError(RuntimeError):
    """llama.cpp refused a model, a context or a decode call."""


class LlamaLoadError(LlamaCppError, ArtifactOpenError):
    """llama.cpp refused a GGUF file (a one-line error naming the file, like any unopenable artifact)."""


# ------------------------------------------------------------------------------------------------ metadata
def open_gguf(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` of ``path``; ArtifactOpenError naming the file if it is not a readable GGUF."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, numpy errors... on bad bytes
        raise unopenable(Path(path), "the GGUF reader", exc) from exc


def _field(reader: gguf.GGUFReader, key: str, source: str):
    f = reader.fields.get(key)
    if f is None:
        raise ArtifactOpenError(f"{source}: missing GGUF metadata key {key!r} (export with export/gguf_export.py)")
    try:
        return f.contents()
    except Exception as exc:  # a field whose type and data disagree
        raise ArtifactOpenError(f"{source}: GGUF metadata key {key!r} cannot be read ({type(exc).__name__})") from exc


def _number(reader: gguf.GGUFReader, key: str, source: str, kind: type):
    value = _field(reader, key, source)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ArtifactOpenError(f"{source}: GGUF metadata key {key!r} holds {type(value).__name__}, expected a "
                                f"{kind.__name__}") from None


@dataclass(frozen=True)
class GGUFModelInfo:
    """The dims and constants the backend needs, from the trunk GGUF's metadata."""

    hidden_size: int
    vocab_size: int
    fork_layer: int
    main_layers: int
    mimo_layers: int
    token_offset: int
    adaptor_input_dim: int
    adaptor_eps: float
    feature_scale: float
    use_whisper_feature: bool
    context_length: int

    def validate(self) -> None:
        if not 0 <= self.fork_layer < self.main_layers - 1:
            raise ArtifactOpenError(f"fork_layer={self.fork_layer}: expected in [0, main_layers-1={self.main_layers - 1})")
        for name in ("hidden_size", "vocab_size", "main_layers", "context_length"):
            if getattr(self, name) <= 0:
                raise ArtifactOpenError(f"{name}={getattr(self, name)}: expected > 0")


def read_model_info(reader: gguf.GGUFReader, source: str) -> GGUFModelInfo:
    """Reads :class:`GGUFModelInfo` from a trunk GGUF (role must be "trunk")."""
    role = _field(reader, KIMIA_KEYS["role"], source)
    if role != "trunk":
        raise ArtifactOpenError(f"{source}: expected a trunk GGUF (kimia.role='trunk'), got {role!r}")
    info = GGUFModelInfo(
        hidden_size=_number(reader, KIMIA_KEYS["hidden_size"], source, int),
        vocab_size=_number(reader, KIMIA_KEYS["vocab_size"], source, int),
        fork_layer=_number(reader, KIMIA_KEYS["fork"], source, int),
        main_layers=_number(reader, KIMIA_KEYS["main_layers"], source, int),
        mimo_layers=_number(reader, KIMIA_KEYS["mimo_layers"], source, int),
        token_offset=_number(reader, KIMIA_KEYS["token_offset"], source, int),
        adaptor_input_dim=_number(reader, KIMIA_KEYS["adaptor_input_dim"], source, int),
        adaptor_eps=_number(reader, KIMIA_KEYS["adaptor_eps"], source, float),
        feature_scale=_number(reader, KIMIA_KEYS["feature_scale"], source, float),
        use_whisper_feature=bool(_field(reader, KIMIA_KEYS["use_whisper_feature"], source)),
        context_length=_number(reader, CONTEXT_LENGTH_KEY, source, int),
    )
    info.validate()
    return info


def _tensor(reader: gguf.GGUFReader, name: str, source: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise ArtifactOpenError(f"{source}: tensor {name!r} not found")


def _as_f32(t) -> np.ndarray:
    """Whole tensor as float32 in numpy (out, in) order."""
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)


class EmbeddingTable:
    """Rows of ``token_embd`` read on demand from the memory-mapped GGUF: [n] ids -> [n, hidden] float32."""

    def __init__(self, reader: gguf.GGUFReader, source: str, hidden: int) -> None:
        t = _tensor(reader, "token_embd.weight", source)
        self._data = t.data  # memmap: [rows, hidden] (F32/F16) or [rows, bytes] (quantized)
        self._type = t.tensor_type
        self.rows = int(t.shape[-1])  # GGUF shape is (in, out)
        self.hidden = hidden

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise ValueError(f"token ids: expected in [0, {self.rows}), got range [{ids.min()}, {ids.max()}]")
        raw = self._data[ids]
        if self._type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return np.asarray(raw, dtype=np.float32).reshape(len(ids), self.hidden)
        return gguf.quants.dequantize(np.asarray(raw), self._type).astype(np.float32).reshape(len(ids), self.hidden)


class FeatureAdaptor:
    """The VQ adaptor in numpy (reference §1.2): Linear(D->H)+b, SiLU, Linear(H->H)+b, LayerNorm(eps, affine).
    Weights from ``llm_adaptor.gguf``; input [n, D] float32 -> [n, H] float32."""

    def __init__(self, path: Path, eps: float) -> None:
        reader = open_gguf(path)
        src = str(path)
        role = _field(reader, KIMIA_KEYS["role"], src)
        if role != "adaptor":
            raise ArtifactOpenError(f"{src}: expected an adaptor GGUF (kimia.role='adaptor'), got {role!r}")
        self.w1, self.b1, self.w2, self.b2, self.gamma, self.beta = (
            _as_f32(_tensor(reader, name, src)) for name in ADAPTOR_TENSORS)
        self.eps = np.float32(eps)
        self.input_dim = self.w1.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features: expected [n, {self.input_dim}], got {x.shape}")
        h = x @ self.w1.T + self.b1
        h = h / (np.float32(1.0) + np.exp(-h))  # SiLU
        h = h @ self.w2.T + self.b2
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + self.eps) * self.gamma + self.beta


# ------------------------------------------------------------------------------------------- llama.cpp glue
def _ggml_base() -> ctypes.CDLL:
    lib_dir = Path(llama.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise LlamaCppError(f"libggml-base not found in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


_GGML: Optional[ctypes.CDLL] = None
_BACKEND_READY = False


def _forward_log(level: int, text: bytes, user_data) -> None:
    # ggml_log_level in the ggml.h llama-cpp-python ships: 3 = WARN, 4 = ERROR (llama_cpp/_logger.py's comment,
    # 2 = WARN, is an older ggml); everything else stays quiet
    if level in (3, 4) and text:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


_LOG_CB = llama.llama_log_callback(_forward_log)


def _init_backend() -> ctypes.CDLL:
    global _GGML, _BACKEND_READY
    if not _BACKEND_READY:
        if not os.environ.get("KIMIA_LLAMA_VERBOSE"):
            llama.llama_log_set(_LOG_CB, None)
        llama.llama_backend_init()
        _BACKEND_READY = True
    if _GGML is None:
        _GGML = _ggml_base()
    return _GGML


@contextmanager
def llama_log_capture() -> Iterator[List[str]]:
    """Collects every piece of text llama.cpp logs while inside, at every level (e.g. ``load_tensors: offloaded
    29/29 layers to GPU``), into the yielded list; afterwards its log is quiet again (its own, on stderr, with
    ``KIMIA_LLAMA_VERBOSE``). bench/gpu_check.py reads the offloaded layer count from it."""
    _init_backend()
    pieces: List[str] = []

    def keep(level: int, text: bytes, user_data) -> None:
        if text:
            pieces.append(text.decode("utf-8", "replace"))

    callback = llama.llama_log_callback(keep)  # referenced until llama.cpp stops calling it
    llama.llama_log_set(callback, None)
    try:
        yield pieces
    finally:
        llama.llama_log_set(None if os.environ.get("KIMIA_LLAMA_VERBOSE") else _LOG_CB, None)


class HiddenCapture:
    """cb_eval callback in Python that copies one named graph tensor (e.g. ``l_out-21``) to host memory, per ubatch.

    The fallback of :class:`NativeHiddenCapture`: llama.cpp calls it (through ctypes, taking the GIL) for every
    graph node of every decode, ~0.3-0.5 ms per step on the small snapshot and more at full size."""

    kind = "python"
    user_data = None  # cb_eval_user_data

    def __init__(self, ggml: ctypes.CDLL, name: str, width: int) -> None:
        self._ggml = ggml
        self.name = name.encode()
        self.width = width
        self.chunks: List[np.ndarray] = []
        self.error: Optional[str] = None
        self.callback = llama.ggml_backend_sched_eval_callback(self._on_eval)

    def _on_eval(self, tensor, ask, user_data) -> bool:
        if self._ggml.ggml_get_name(tensor) != self.name:
            return False if ask else True
        if ask:
            return True
        n = self._ggml.ggml_nelements(tensor)
        nbytes = self._ggml.ggml_nbytes(tensor)
        if nbytes != 4 * n or n % self.width:
            self.error = f"{self.name.decode()}: expected float32 [*, {self.width}], got {nbytes} bytes / {n} elements"
            return True
        buf = np.empty((n // self.width, self.width), dtype=np.float32)
        self._ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, nbytes)
        self.chunks.append(buf)
        return True

    def after_decode(self) -> None:
        """Called after every llama_decode of the capturing model (the Python callback has nothing to collect)."""

    def clear(self) -> None:
        self.chunks = []
        self.error = None

    def take(self) -> np.ndarray:
        if self.error is not None:
            err, self.error = self.error, None
            self.chunks.clear()
            raise LlamaCppError(err)
        out = self.chunks[0] if len(self.chunks) == 1 else np.concatenate(self.chunks, axis=0)
        self.chunks = []
        return out


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class NativeHiddenCapture(HiddenCapture):
    """The same capture with the callback in C++ (``kimia_edge._native.EvalCapture``, cpp_ext/eval_capture.hpp):
    llama.cpp calls a C function that compares each node's name with ``name`` and returns at once for every other
    node; the wanted tensor is copied into a preallocated [capacity_rows, width] float32 buffer with
    ``ggml_backend_tensor_get``. No Python and no GIL per graph node. The rows of one llama_decode are moved into
    ``chunks`` by :meth:`after_decode` (capacity_rows must be >= the context's n_ubatch)."""

    kind = "native"

    def __init__(self, ggml: ctypes.CDLL, name: str, width: int, capacity_rows: int) -> None:
        from kimia_edge._native import EvalCapture

        self.name = name.encode()
        self.width = width
        self.chunks = []
        self.error = None
        self._native = EvalCapture(name, width, capacity_rows, _address(ggml.ggml_get_name),
                                   _address(ggml.ggml_nelements), _address(ggml.ggml_nbytes),
                                   _address(ggml.ggml_backend_tensor_get))
        self._buffer = self._native.buffer
        self.callback = llama.ggml_backend_sched_eval_callback(EvalCapture.callback_address)
        self.user_data = ctypes.c_void_p(self._native.user_data)

    def after_decode(self) -> None:
        err = self._native.error
        if err is not None and self.error is None:
            self.error = err
        n = self._native.rows
        if n and self.error is None:
            self.chunks.append(self._buffer[:n].copy())
        self._native.reset()

    def clear(self) -> None:
        super().clear()
        self._native.reset()


EVAL_CALLBACKS = ("auto", "native", "python")


def make_capture(ggml: ctypes.CDLL, name: str, width: int, capacity_rows: int,
                 eval_callback: str = "auto") -> HiddenCapture:
    """The hand-off capture: native (C++) by default; the Python callback when asked (``eval_callback="python"``
    or the environment variable ``KIMIA_EVAL_CALLBACK=python``) or, with "auto", when the extension has no
    ``EvalCapture`` (a stale build of cpp_ext: rebuild with ``pip install --no-deps -e .``)."""
    if eval_callback not in EVAL_CALLBACKS:
        raise ValueError(f"eval_callback={eval_callback!r}: expected one of {EVAL_CALLBACKS}")
    if eval_callback == "auto":
        eval_callback = os.environ.get("KIMIA_EVAL_CALLBACK", "auto") or "auto"
        if eval_callback not in EVAL_CALLBACKS:
            raise ValueError(f"KIMIA_EVAL_CALLBACK={eval_callback!r}: expected one of {EVAL_CALLBACKS}")
    if eval_callback == "python":
        return HiddenCapture(ggml, name, width)
    try:
        return NativeHiddenCapture(ggml, name, width, capacity_rows)
    except ImportError:
        if eval_callback == "native":
            raise
        log.warning("kimia_edge._native has no EvalCapture (stale build): using the Python eval callback")
        return HiddenCapture(ggml, name, width)


class LlamaModel:
    """One GGUF model + one context (sequence 0) fed with embeddings; owns its native resources (``close()``)."""

    def __init__(self, path: Path, *, n_ctx: int, n_batch: int, n_threads: int, n_gpu_layers: int, exact: bool,
                 capture: Optional[HiddenCapture] = None, repack: bool = True) -> None:
        _init_backend()
        self.path = Path(path)
        mp = llama.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = repack
        self._model = llama.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise LlamaLoadError(f"{self.path}: llama.cpp cannot load the model (KIMIA_LLAMA_VERBOSE=1 shows why); "
                                    "if it matches the manifest, the bundle was written corrupt: export it again")
        self.n_embd = int(llama.llama_model_n_embd(self._model))
        self.n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
        cp = llama.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.no_perf = True
        if exact:
            cp.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.type_k = _GGML_TYPE_F32
            cp.type_v = _GGML_TYPE_F32
        self.capture = capture
        if capture is not None:
            cp.cb_eval = capture.callback
            if capture.user_data is not None:
                cp.cb_eval_user_data = capture.user_data
        self._ctx = llama.llama_init_from_model(self._model, cp)
        if not self._ctx:
            llama.llama_model_free(self._model)
            self._model = None
            raise LlamaCppError(f"{self.path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self.n_batch = n_batch
        self._batch = llama.llama_batch_init(n_batch, self.n_embd, 1)
        self._mem = llama.llama_get_memory(self._ctx)

    def clear(self) -> None:
        """Empties the KV cache."""
        llama.llama_memory_clear(self._mem, True)

    def decode(self, embeds: np.ndarray, pos0: int, want_logits: bool) -> Optional[np.ndarray]:
        """Runs [T, n_embd] embeddings at positions pos0..pos0+T-1 (split into n_batch chunks); returns the last
        position's logits [n_vocab] (copy) when ``want_logits``, else None (no output row is computed)."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        t = embeds.shape[0]
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
            raise ValueError(f"embeddings: expected [T, {self.n_embd}], got {embeds.shape}")
        b = self._batch
        for s in range(0, t, self.n_batch):
            n = min(self.n_batch, t - s)
            last_chunk = s + n == t
            ctypes.memmove(b.embd, embeds[s:s + n].ctypes.data, n * self.n_embd * 4)
            for i in range(n):
                b.pos[i] = pos0 + s + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if (want_logits and last_chunk and i == n - 1) else 0
            b.n_tokens = n
            rc = llama.llama_decode(self._ctx, b)
            if self.capture is not None:
                self.capture.after_decode()
            if rc != 0:
                raise LlamaCppError(f"{self.path.name}: llama_decode returned {rc} at positions "
                                    f"{pos0 + s}..{pos0 + s + n - 1}")
        if not want_logits:
            return None
        ptr = llama.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)
            self._model = None


# ------------------------------------------------------------------------------------------------ backend


class LlamaCppBackend:
    """`LLMBackend` on llama.cpp: prefill / step / reset, plus ``append`` (multi-turn: continue the cache).

    trunk_path / audio_path / adaptor_path: the GGUF files (audio and adaptor may be None: text_only mode / no
    continuous features). n_ctx: KV positions per model. n_batch: tokens per llama_decode call (longer prompts are
    split). exact: flash attention off and F32 KV cache (parity tests). text_only: the audio model is never loaded
    nor run and no eval callback is installed (audio logits are always None; ASR / audio QA). feature_scale: overrides the sqrt(2) stored in the file
    (the file holds the value in the snapshot dtype, bf16 1.4140625; an fp32 reference uses 1.4142135).
    eval_callback: the hand-off capture, "auto" (native C++ callback unless ``KIMIA_EVAL_CALLBACK=python``),
    "native" or "python" (:func:`make_capture`). repack: let llama.cpp copy the weights into the CPU layouts of its
    repacked kernels (``use_extra_bufts``; Q4_K on AVX2: a second copy of most of the file in private memory and a
    longer load; what it does to the step's speed is not settled here); False computes on the memory-mapped file as
    it lies (docs/benchmarks.md, memory).
    """

    def __init__(self, trunk_path: Path, audio_path: Optional[Path] = None, adaptor_path: Optional[Path] = None, *,
                 n_ctx: int = 4096, n_batch: int = 512, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
                 exact: bool = False, text_only: bool = False, feature_scale: Optional[float] = None,
                 eval_callback: str = "auto", repack: bool = True) -> None:
        ggml = _init_backend()
        trunk_path = Path(trunk_path)
        reader = open_gguf(trunk_path)
        self.info = read_model_info(reader, str(trunk_path))
        if n_ctx > self.info.context_length:
            raise ValueError(f"n_ctx={n_ctx}: expected <= the model's context length {self.info.context_length}")
        if audio_path is None and not text_only:
            raise ValueError("audio_path is required unless text_only=True")
        n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.text_only = text_only
        self.feature_scale = np.float32(self.info.feature_scale if feature_scale is None else feature_scale)
        self.embed = EmbeddingTable(reader, str(trunk_path), self.info.hidden_size)
        self.adaptor = FeatureAdaptor(Path(adaptor_path), self.info.adaptor_eps) if adaptor_path is not None else None
        self._models: List[LlamaModel] = []
        common = dict(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_gpu_layers=n_gpu_layers, exact=exact,
                      repack=repack)
        try:
            self.capture = None if text_only else make_capture(ggml, f"l_out-{self.info.fork_layer}",
                                                               self.info.hidden_size, n_batch, eval_callback)
            self.trunk = LlamaModel(trunk_path, capture=self.capture, **common)
            self._models.append(self.trunk)
            self.audio: Optional[LlamaModel] = None
            if not text_only:
                self.audio = LlamaModel(Path(audio_path), **common)
                self._models.append(self.audio)
                if self.audio.n_embd != self.trunk.n_embd:
                    raise ValueError(f"{audio_path}: n_embd {self.audio.n_embd} != trunk {self.trunk.n_embd}")
        except Exception:
            self.close()
            raise
        self.n_ctx = n_ctx
        self._position = 0
        self._audio_position = 0
        self._pending: List[np.ndarray] = []

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Frees both llama.cpp models and contexts."""
        for m in getattr(self, "_models", []):
            m.close()
        self._models = []

    def __enter__(self) -> "LlamaCppBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def position(self) -> int:
        """Next position id (= positions in both KV caches)."""
        return self._position

    # ---- inputs ---------------------------------------------------------------------------------------------
    def embed_inputs(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray],
                     continuous_mask: Optional[np.ndarray]) -> np.ndarray:
        """[T, hidden] inputs_embeds, the reference rule (§1.5). features: [n, adaptor_input_dim] raw Whisper
        features (12.5 Hz, 4 frames concatenated), one row per True of continuous_mask [T]."""
        audio_ids = np.asarray(audio_ids, dtype=np.int64).reshape(-1)
        text_ids = np.asarray(text_ids, dtype=np.int64).reshape(-1)
        if audio_ids.shape != text_ids.shape:
            raise ValueError(f"audio_ids {audio_ids.shape} and text_ids {text_ids.shape} must have equal length")
        x = self.embed(audio_ids)
        if features is not None:
            if self.adaptor is None:
                raise ValueError("features given but the backend has no adaptor (adaptor_path=None)")
            if continuous_mask is None:
                raise ValueError("features need continuous_mask")
            mask = np.asarray(continuous_mask, dtype=bool).reshape(-1)
            if mask.shape != audio_ids.shape:
                raise ValueError(f"continuous_mask: expected shape {audio_ids.shape}, got {mask.shape}")
            n = int(mask.sum())
            features = np.asarray(features, dtype=np.float32)
            if features.shape != (n, self.adaptor.input_dim):
                raise ValueError(f"features: expected [{n}, {self.adaptor.input_dim}], got {features.shape}")
            x[mask] = (x[mask] + self.adaptor(features)) * self.feature_scale
        if int(text_ids.sum()) != 0:  # official quirk: text ids summing to 0 skip the text embedding
            x = x + self.embed(text_ids)
        return x

    # ---- decoding -------------------------------------------------------------------------------------------
    def _decode(self, x: np.ndarray, need_text: bool, need_audio: bool) -> StepLogits:
        """Trunk on ``x`` [T, hidden]; the audio model on the captured layer-fork rows, deferred until audio logits
        are needed (the rows wait in ``_pending``; then every waiting row is decoded in one call)."""
        t = x.shape[0]
        if self._position + t > self.n_ctx:
            raise ValueError(f"context full: {self._position} + {t} positions > n_ctx={self.n_ctx}")
        text = self.trunk.decode(x, self._position, want_logits=need_text)
        audio = None
        if self.audio is not None:
            hidden = self.capture.take()
            if hidden.shape[0] != t:
                raise LlamaCppError(f"captured {hidden.shape[0]} rows of l_out-{self.info.fork_layer}, expected {t}")
            self._pending.append(hidden)
            if need_audio:
                rows = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=0)
                self._pending = []
                audio = self.audio.decode(rows, self._audio_position, want_logits=True)
                self._audio_position += rows.shape[0]
        self._position += t
        return text, audio

    @property
    def audio_pending(self) -> int:
        """Positions whose layer-fork states wait for the audio model (it has not run on them yet)."""
        return sum(h.shape[0] for h in self._pending)

    def reset(self) -> None:
        for m in self._models:
            m.clear()
        if self.capture is not None:
            self.capture.clear()
        self._pending = []
        self._position = 0
        self._audio_position = 0

    def prefill(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray],
                continuous_mask: np.ndarray, *, need_text: bool = True, need_audio: bool = True) -> StepLogits:
        """Resets, then runs the prompt at positions 0..L-1; returns last-position (text, audio) logits [V], None
        for a head not needed (``need_*`` as in :meth:`step`)."""
        self.reset()
        return self.append(audio_ids, text_ids, features, continuous_mask, need_text=need_text,
                           need_audio=need_audio)

    def append(self, audio_ids: np.ndarray, text_ids: np.ndarray, features: Optional[np.ndarray] = None,
               continuous_mask: Optional[np.ndarray] = None, *, need_text: bool = True,
               need_audio: bool = True) -> StepLogits:
        """Multi-turn: runs more prompt positions after the cached ones (no reset); same arguments as prefill.
        Audio-branch work deferred by earlier skipped audio heads is caught up here when audio logits are needed."""
        x = self.embed_inputs(audio_ids, text_ids, features, continuous_mask)
        if x.shape[0] == 0:
            raise ValueError("expected at least one position")
        return self._decode(x, need_text, need_audio)

    def step(self, audio_id: int, text_id: int, *, need_text: bool = True, need_audio: bool = True) -> StepLogits:
        """Feeds one (audio, text) pair at the next position; returns (text, audio) logits [V].

        need_text=False: the trunk's head is not computed (its layers still run), text logits None (e.g. once the
        text stream has ended). need_audio=False: the audio model is not run now (its input rows wait until audio
        logits are next asked for), audio logits None (text-only tasks, the audio delay). A text_only backend
        never has audio logits (always None)."""
        x = self.embed_inputs(np.array([audio_id]), np.array([text_id]), None, None)
        return self._decode(x, need_text, need_audio)
