"""Snapshot I/O for the Kimi-Audio LLM (HF `moonshotai/Kimi-Audio-7B-Instruct` layout, reference §2.4, §4).

Reader: `read_llm(folder) -> (KimiaConfig, state_dict)` — config.json, then the sharded safetensors listed by
`model.safetensors.index.json` (or a single `model.safetensors`) as a lazy mapping (export/snapshot/weights.py:
every index entry must be in its shard and every shard key in the index; a tensor is loaded when it is read).
Stored `*.rotary_emb.inv_freq` entries are returned too; the model loader ignores them explicitly.

Writer: `write_llm(folder, size, seed)` — random bf16 weights in the official layout: config.json with every field
of the official config class (rope_theta included: 1e6, Qwen2.5-7B's value, since the real one is UNKNOWN),
layer shards `model-{k}-of-{n}.safetensors` plus one extra shard `model-{n+1}-of-{n+1}.safetensors` holding
embed_tokens, norm, mimo_norm, lm_head, mimo_output (the official odd naming), the index, one `inv_freq` per layer
(as the official index has), and the text tokenizer files: `tiktoken.model`, `tokenizer_config.json`,
`special_tokens_map.json`.

The tokenizer written here is a small byte-level BPE (256 byte tokens + merges learned from a fixed English text)
whose ranks stay far below the real base size 151 643; the special tokens keep their official ids 151 643…152 063
(421 = 152 064 - 151 643, the last one is the pad), so the ids between the BPE and the specials are unused holes.
`vocab_size` = kimia_token_offset (152 064) + codebook size, so the embedding always covers the specials.

Tensors are generated and written one at a time, in row blocks (numpy RNG per tensor from (seed, tensor index),
bf16 by round-to-nearest-even), so `full` (19.5 GB) never holds more than one block in memory.
"""
from __future__ import annotations

import collections
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from kimia_edge.export.snapshot.presets import preset
from kimia_edge.export.snapshot.weights import INDEX_FILE, LazyStateDict, open_weights
from kimia_edge.runtime.llm_config import CONFIG_FILE, KimiaConfig
from kimia_edge.runtime.special_tokens import SPECIAL_TOKENS_MAP_FILE, TOKEN_NAMES, TOKENIZER_CONFIG_FILE, SpecialTokens
from kimia_edge.runtime.text_tokenizer import TIKTOKEN_FILE, format_tiktoken_ranks

__all__ = ["read_llm", "write_llm", "llm_tensor_specs", "ADAPTOR_PREFIX"]

# Checkpoint key prefix of the continuous-feature adaptor (HFM module path, reference §2.4).
ADAPTOR_PREFIX = "model.vq_adaptor."


# Official text base vocabulary and special range (reference §1.3): specials 151 643 … 152 063, audio from 152 064.
NUM_BASE_TOKENS = 151643
TEXT_VOCAB = 152064
# rope_theta written into generated snapshots (Qwen2.5-7B's; the real Kimi value is UNKNOWN, reference §6.1).
GENERATED_ROPE_THETA = 1_000_000.0
# Number of BPE merges learned for generated snapshots (a few hundred keeps the file tiny).
GENERATED_BPE_MERGES = 300


# ----------------------------------------------------------------------------------------------------- reader
def read_llm(folder: Path) -> Tuple[KimiaConfig, LazyStateDict]:
    """Reads config.json and the (sharded) safetensors of an HF Kimi-Audio snapshot folder (lazy, index checked
    strictly against the shards: ``export.snapshot.weights.open_weights``)."""
    folder = Path(folder)
    cfg = KimiaConfig.from_snapshot(folder)
    return cfg, open_weights(folder)


# ----------------------------------------------------------------------------------------------------- writer
@dataclass(frozen=True)
class _Size:
    hidden: int
    intermediate: int
    layers: int
    mimo_layers: int
    fork: int
    heads: int
    kv_heads: int
    codebook: int
    adaptor_in: int
    shard_bytes: int


_SIZES = {
    # hidden 16 keeps 3 x [152 576, 16] bf16 matrices at 14.6 MB; adaptor input 256 = 4 x 64, the tiny Whisper of
    # the official fixtures.
    "tiny": _Size(16, 32, 4, 2, 1, 2, 1, 512, 256, 16 << 10),
    # same depth-wise structure as full, widths multiples of 256 (K-quants), head_dim 128 like full.
    "small": _Size(512, 1024, 28, 6, 21, 4, 2, 16384, 1024, 100 << 20),  # adaptor in = 4 x small Whisper d_model 256
    # Kimi-Audio-7B-Instruct (reference §2.1).
    "full": _Size(3584, 18944, 28, 6, 21, 28, 4, 16384, 5120, 500 << 20),
}


def _config_dict(s: _Size) -> dict:
    """config.json content: the official class fields (KimiAudioConfig + Qwen2Config) with this size's values."""
    return {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
                     "AutoModel": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
                     "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"},
        "model_type": "qwen2",  # KimiAudioConfig inherits Qwen2Config's model_type
        "vocab_size": TEXT_VOCAB + s.codebook,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "rope_theta": GENERATED_ROPE_THETA,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "kimia_mimo_layers": s.mimo_layers,
        "kimia_mimo_audiodelaytokens": 6,
        "kimia_mimo_transformer_from_layer_index": s.fork,
        "kimia_audio_output_vocab": s.codebook + 512,
        "kimia_text_output_vocab": TEXT_VOCAB,
        "num_audio_special_tokens": 512,
        "num_base_tokens": NUM_BASE_TOKENS,
        "kimia_token_offset": TEXT_VOCAB,
        "use_whisper_feature": True,
        "kimia_adaptor_input_dim": s.adaptor_in,
        "kimia_media_begin": SpecialTokens().media_begin,
        "kimia_media_end": SpecialTokens().media_end,
    }


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: Tuple[int, ...]
    init: str      # "matrix" (N(0, 1/fan_in)), "embed" (N(0,1)), "bias", "norm", "inv_freq"
    shard: str     # "layers" or "heads"


def llm_tensor_specs(cfg: KimiaConfig) -> List[_Spec]:
    """Every stored tensor (official names, official order: layers, MIMO layers, adaptor, then the heads shard)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    specs: List[_Spec] = []

    def layer(prefix: str) -> None:
        a = f"{prefix}.self_attn"
        specs.extend([
            _Spec(f"{prefix}.input_layernorm.weight", (h,), "norm", "layers"),
            _Spec(f"{a}.q_proj.weight", (q, h), "matrix", "layers"), _Spec(f"{a}.q_proj.bias", (q,), "bias", "layers"),
            _Spec(f"{a}.k_proj.weight", (kv, h), "matrix", "layers"), _Spec(f"{a}.k_proj.bias", (kv,), "bias", "layers"),
            _Spec(f"{a}.v_proj.weight", (kv, h), "matrix", "layers"), _Spec(f"{a}.v_proj.bias", (kv,), "bias", "layers"),
            _Spec(f"{a}.o_proj.weight", (h, q), "matrix", "layers"),
            _Spec(f"{a}.rotary_emb.inv_freq", (d // 2,), "inv_freq", "layers"),
            _Spec(f"{prefix}.post_attention_layernorm.weight", (h,), "norm", "layers"),
            _Spec(f"{prefix}.mlp.gate_proj.weight", (f, h), "matrix", "layers"),
            _Spec(f"{prefix}.mlp.up_proj.weight", (f, h), "matrix", "layers"),
            _Spec(f"{prefix}.mlp.down_proj.weight", (h, f), "matrix", "layers"),
        ])

    for i in range(cfg.num_hidden_layers):
        layer(f"model.layers.{i}")
    for j in range(cfg.kimia_mimo_layers):
        layer(f"model.mimo_layers.{j}")
    specs.extend([
        _Spec(f"{ADAPTOR_PREFIX}layers.0.weight", (h, cfg.kimia_adaptor_input_dim), "matrix", "layers"),
        _Spec(f"{ADAPTOR_PREFIX}layers.0.bias", (h,), "bias", "layers"),
        _Spec(f"{ADAPTOR_PREFIX}layers.3.weight", (h, h), "matrix", "layers"),
        _Spec(f"{ADAPTOR_PREFIX}layers.3.bias", (h,), "bias", "layers"),
        _Spec(f"{ADAPTOR_PREFIX}layers.4.weight", (h,), "norm", "layers"),
        _Spec(f"{ADAPTOR_PREFIX}layers.4.bias", (h,), "bias", "layers"),
        _Spec("model.embed_tokens.weight", (cfg.vocab_size, h), "embed", "heads"),
        _Spec("model.norm.weight", (h,), "norm", "heads"),
        _Spec("model.mimo_norm.weight", (h,), "norm", "heads"),
        _Spec("lm_head.weight", (cfg.vocab_size, h), "matrix", "heads"),
        _Spec("mimo_output.weight", (cfg.vocab_size, h), "matrix", "heads"),
    ])
    return specs


_BLOCK_ELEMENTS = 1 << 22  # rows generated per block: ~4 M values (16 MB fp32)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


# Random heads pick uniformly over all 152k+ ids, so a random model would almost never emit an audio id (codebook
# rows are ~0.3 % of the vocabulary) nor a word of the generated BPE. Generated snapshots therefore give the rows of
# each head's own range this larger norm: the weights stay random, but greedy picks land in range and every stage
# downstream (text decoding, the detokenizer, the vocoder) gets real work.
HEAD_RANGE_GAIN = 3.0
_BYTE_TOKENS = 256


def favoured_head_rows(name: str, cfg: KimiaConfig) -> Optional[Tuple[int, int]]:
    """[start, stop) of the rows whose norm a generated snapshot scales by HEAD_RANGE_GAIN, or None."""
    if name == "lm_head.weight":  # text head: the learned BPE merges (word pieces)
        return (_BYTE_TOKENS, _BYTE_TOKENS + GENERATED_BPE_MERGES)
    if name == "mimo_output.weight":  # audio head: the semantic codebook
        return (cfg.kimia_token_offset, cfg.vocab_size)
    return None


def _blocks(spec: _Spec, cfg: KimiaConfig, seed: int, index: int) -> Iterator[np.ndarray]:
    """The tensor's values as bf16 bit blocks (row-major)."""
    rng = np.random.default_rng([seed, index])
    if spec.init == "inv_freq":
        d = cfg.head_dim
        yield _to_bf16_bits(1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)))
        return
    rows = spec.shape[0]
    row_len = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1
    step = max(1, _BLOCK_ELEMENTS // row_len)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0) * row_len
        z = rng.standard_normal(n, dtype=np.float32)
        if spec.init == "matrix":
            z *= np.float32(1.0 / math.sqrt(spec.shape[1]))
            favoured = favoured_head_rows(spec.name, cfg)
            if favoured is not None:
                rows_here = z.reshape(-1, row_len)
                lo, hi = max(favoured[0] - r0, 0), min(favoured[1] - r0, rows_here.shape[0])
                if lo < hi:
                    rows_here[lo:hi] *= np.float32(HEAD_RANGE_GAIN)
        elif spec.init == "bias":
            z *= np.float32(0.02)
        elif spec.init == "norm":
            z = np.float32(1.0) + np.float32(0.1) * z
        yield _to_bf16_bits(z)


def _write_shard(path: Path, specs: List[Tuple[int, _Spec]], cfg: KimiaConfig, seed: int) -> int:
    """Streams one safetensors file; returns its data byte count."""
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, s in specs:
        nbytes = int(np.prod(s.shape)) * 2
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for idx, s in specs:
            for block in _blocks(s, cfg, seed, idx):
                f.write(block.tobytes())
    return offset


def write_llm(folder: Path, size: str, seed: int) -> None:
    """Writes a random-weight LLM snapshot of ``size`` ("tiny", "small", "full") into ``folder``."""
    s = preset(size, _SIZES)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw_cfg = _config_dict(s)
    cfg = KimiaConfig.from_dict(raw_cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(raw_cfg, indent=2) + "\n", encoding="utf-8")

    specs = list(enumerate(llm_tensor_specs(cfg)))
    groups: List[List[Tuple[int, _Spec]]] = [[]]
    used = 0
    for idx, spec in specs:
        if spec.shard != "layers":
            continue
        nbytes = int(np.prod(spec.shape)) * 2
        if groups[-1] and used + nbytes > s.shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((idx, spec))
        used += nbytes
    heads = [(idx, spec) for idx, spec in specs if spec.shard == "heads"]
    n = len(groups)
    names = [f"model-{k + 1}-of-{n}.safetensors" for k in range(n)] + [f"model-{n + 1}-of-{n + 1}.safetensors"]
    weight_map: Dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups + [heads]):
        total += _write_shard(folder / name, group, cfg, seed)
        weight_map.update({spec.name: name for _, spec in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer(folder)


# -------------------------------------------------------------------------------------------------- tokenizer
# Fixed English text the generated BPE merges are learned from (written for this project).
_BPE_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Speech models listen to sound and answer with text or with speech.
A audio language model reads two streams at once: one stream holds the audio tokens and the other holds the text
tokens. Every step of generation produces one text token and one audio token, and both are fed back into the
model. The text stream finishes with an end of sequence token, while the audio stream continues until the speaker
has finished the answer. Please transcribe the following audio. What is the weather like today? It is sunny and
warm in the morning, then the wind turns and the rain comes back in the evening. The detokenizer turns semantic
tokens into a mel spectrogram, and the vocoder turns the mel spectrogram into a waveform at twenty four thousand
samples per second. Numbers such as 1, 2, 3, 12.5 and 2025 are split into single digits. Short answers are better
than long answers when the question is simple. Thank you for listening, and have a nice day.
"""
_PRETOKEN = re.compile(rb" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


def _learn_bpe(text: str, n_merges: int) -> Dict[bytes, int]:
    """Byte-level BPE: ranks 0..255 = single bytes, then one rank per learned merge (most frequent pair first, ties
    broken by the pair's bytes)."""
    ranks: Dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words = collections.Counter(_PRETOKEN.findall(text.encode("utf-8")))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    for _ in range(n_merges):
        pairs: Dict[Tuple[bytes, bytes], int] = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return ranks


def _special_names() -> Dict[int, str]:
    """id -> token string for the 421 specials: documented names, placeholders for the reserved ones."""
    named = {v: k for k, v in SpecialTokens().by_name().items()}
    return {i: named.get(i, f"<|reserved_token_{i - NUM_BASE_TOKENS}|>") for i in range(NUM_BASE_TOKENS, TEXT_VOCAB)}


def _write_tokenizer(folder: Path) -> None:
    ranks = _learn_bpe(_BPE_TRAINING_TEXT, GENERATED_BPE_MERGES)
    (folder / TIKTOKEN_FILE).write_text(format_tiktoken_ranks(ranks), encoding="ascii")
    specials = _special_names()
    pad_name = specials[SpecialTokens().pad]
    tok_cfg = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimia.TikTokenTokenizer", None]},
        "bos_token": TOKEN_NAMES["bos"],
        "eos_token": TOKEN_NAMES["eos"],
        "pad_token": pad_name,
        "model_max_length": 1000000000000000019884624838656,
        "added_tokens_decoder": {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, name in specials.items()},
    }
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    smap = {"bos_token": TOKEN_NAMES["bos"], "eos_token": TOKEN_NAMES["eos"], "pad_token": pad_name}
    (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(smap, indent=2) + "\n", encoding="utf-8")
