"""Kimi-Audio text tokenizer: tiktoken-format byte-level BPE (`tiktoken.model`) plus the special tokens.

`tiktoken.model` holds one ``<base64 token bytes> <rank>`` per line; ranks are the token ids of the base
vocabulary (151 643 in the real file). Special tokens (ids from ``tokenizer_config.json``'s
``added_tokens_decoder``) follow. The pre-tokenizer regex (``pat_str``) of the official ``tokenization_kimia.py``
is UNKNOWN (reference §6.3): it is read from ``tokenizer_config.json`` key ``pat_str`` when present, else the
Qwen2 regex below (the vLLM port's choice) is used.

The official prompt manager calls ``encode(text, bos=False, eos=False)``: special-token strings inside user text are
encoded as plain text, never as special ids. Decoding renders special ids as their token strings.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import tiktoken

from .special_tokens import TOKENIZER_CONFIG_FILE, read_added_tokens

__all__ = ["TextTokenizer", "QWEN2_PAT_STR", "TIKTOKEN_FILE", "read_tiktoken_ranks", "format_tiktoken_ranks"]

log = logging.getLogger(__name__)

TIKTOKEN_FILE = "tiktoken.model"

# Qwen2 pre-tokenizer regex (single digits, case-insensitive English contractions). Default because the official
# Kimi pattern is UNKNOWN; a snapshot may override it with tokenizer_config.json "pat_str".
QWEN2_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    """Parses a tiktoken BPE file: token bytes -> rank. Raises ValueError naming the line on bad input."""
    ranks: Dict[bytes, int] = {}
    with Path(path).open("rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64> <rank>', got {line[:60]!r}")
            token, rank = base64.b64decode(parts[0]), int(parts[1])
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} listed twice")
            ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: duplicate ranks")
    return ranks


def format_tiktoken_ranks(ranks: Mapping[bytes, int]) -> str:
    """The inverse of :func:`read_tiktoken_ranks` (lines sorted by rank)."""
    return "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


class TextTokenizer:
    """Byte-level BPE with special tokens. ``encode`` -> list of ids; ``decode`` -> str."""

    def __init__(self, mergeable_ranks: Mapping[bytes, int], special_tokens: Mapping[str, int],
                 pat_str: str = QWEN2_PAT_STR, name: str = "kimia") -> None:
        missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing_bytes:
            raise ValueError(f"BPE ranks lack {len(missing_bytes)} single-byte tokens (e.g. {missing_bytes[:4]}): "
                             "every byte must be encodable")
        num_base = max(mergeable_ranks.values()) + 1
        clash = {n: i for n, i in special_tokens.items() if i < num_base}
        if clash:
            raise ValueError(f"special ids must be >= the base vocabulary size {num_base}, got {clash}")
        self.num_base_tokens = num_base
        self.special_tokens: Dict[str, int] = dict(special_tokens)
        self.pat_str = pat_str
        self._enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=dict(mergeable_ranks),
                                      special_tokens=self.special_tokens)
        self._known_ids = set(mergeable_ranks.values()) | set(self.special_tokens.values())

    @classmethod
    def from_snapshot(cls, folder: Path) -> "TextTokenizer":
        """Loads ``tiktoken.model`` + ``tokenizer_config.json`` (specials, optional ``pat_str``) from ``folder``.
        ArtifactOpenError (a BundleError) naming the folder and the reason if the files cannot make a tokenizer."""
        from .bundle import unopenable

        try:
            return cls._from_snapshot(Path(folder))
        except (ValueError, OSError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise unopenable(Path(folder), "the text tokenizer", e) from e

    @classmethod
    def _from_snapshot(cls, folder: Path) -> "TextTokenizer":
        ranks = read_tiktoken_ranks(folder / TIKTOKEN_FILE)
        specials = read_added_tokens(folder)
        pat_str = QWEN2_PAT_STR
        cfg_path = folder / TOKENIZER_CONFIG_FILE
        if cfg_path.exists():
            pat_str = json.loads(cfg_path.read_text(encoding="utf-8")).get("pat_str") or QWEN2_PAT_STR
        if pat_str is QWEN2_PAT_STR:
            log.info("%s: no pat_str in %s; using the Qwen2 pre-tokenizer regex", folder, TOKENIZER_CONFIG_FILE)
        return cls(ranks, specials, pat_str=pat_str)

    @property
    def vocab_size(self) -> int:
        """Highest id + 1 (base ranks and specials)."""
        return max(self._known_ids) + 1

    def encode(self, text: str) -> List[int]:
        """Text -> ids, no BOS/EOS; special-token strings in ``text`` are encoded as ordinary text."""
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int], *, skip_unknown: bool = False) -> str:
        """Ids -> text (invalid UTF-8 replaced by U+FFFD). An id outside the vocabulary raises ValueError unless
        ``skip_unknown`` (small generated snapshots have holes between their base ranks and the special ids)."""
        ids = [int(i) for i in ids]
        unknown = [i for i in ids if i not in self._known_ids]
        if unknown:
            if not skip_unknown:
                raise ValueError(f"ids not in the vocabulary: {unknown[:8]}")
            ids = [i for i in ids if i in self._known_ids]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> raw bytes (for incremental, UTF-8-safe streaming)."""
        return self._enc.decode_bytes([int(i) for i in ids])

    def id_of(self, token: str) -> Optional[int]:
        """Id of a special-token string, or None."""
        return self.special_tokens.get(token)
