"""The LLM's GGUF files as both worlds see them: file names, roles, our ``kimia.*`` metadata keys and the adaptor's
tensor names. ``export/gguf_export.py`` writes them, ``runtime/llm_llamacpp.py`` reads them.

``llm_trunk.gguf`` is a stock qwen2 file (main layers + norm + lm_head); ``llm_audio.gguf`` a qwen2 file holding the
MIMO layers (mimo_norm as output_norm, mimo_output as the tied head); ``llm_adaptor.gguf`` the continuous-feature
adaptor (not a llama.cpp architecture: read with ``gguf.GGUFReader``).
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["FILES", "ARCH", "ADAPTOR_ARCH", "KIMIA_KEYS", "CONTEXT_LENGTH_KEY", "ADAPTOR_TENSORS"]

FILES: Dict[str, str] = {"trunk": "llm_trunk.gguf", "audio": "llm_audio.gguf", "adaptor": "llm_adaptor.gguf"}
ARCH = "qwen2"
ADAPTOR_ARCH = "kimia-adaptor"

# Our own metadata keys: field -> GGUF key (every file carries them).
KIMIA_KEYS: Dict[str, str] = {
    "role": "kimia.role",                          # "trunk" | "audio" | "adaptor"
    "fork": "kimia.fork_layer",                    # kimia_mimo_transformer_from_layer_index
    "main_layers": "kimia.main_layers",            # num_hidden_layers
    "mimo_layers": "kimia.mimo_layers",            # kimia_mimo_layers
    "token_offset": "kimia.token_offset",          # kimia_token_offset
    "vocab_size": "kimia.vocab_size",
    "hidden_size": "kimia.hidden_size",
    "media_begin": "kimia.media_begin",
    "media_end": "kimia.media_end",
    "adaptor_input_dim": "kimia.adaptor_input_dim",
    "adaptor_eps": "kimia.adaptor_layer_norm_eps",  # the adaptor LayerNorm uses rms_norm_eps (reference §1.2)
    "feature_scale": "kimia.continuous_feature_scale",  # sqrt(2) rounded to the snapshot dtype (reference §1.5)
    "use_whisper_feature": "kimia.use_whisper_feature",
    "source": "kimia.source_snapshot",
    "source_dtype": "kimia.source_dtype",
}
CONTEXT_LENGTH_KEY = f"{ARCH}.context_length"

# The adaptor's tensors in llm_adaptor.gguf: Linear(fc1) -> GELU -> Linear(fc2) -> LayerNorm(norm).
ADAPTOR_TENSORS: Tuple[str, ...] = ("adaptor.fc1.weight", "adaptor.fc1.bias", "adaptor.fc2.weight", "adaptor.fc2.bias",
                                    "adaptor.norm.weight", "adaptor.norm.bias")
