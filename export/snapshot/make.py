"""``kimia-edge snapshot make``: a random-weight snapshot in the official layout, deterministic by seed.

The Kimi-Audio snapshot (LLM shards, ``whisper-large-v3/``, ``audio_detokenizer/``, ``vocoder/``, tokenizer
files) is written at ``out``; the GLM-4-Voice tokenizer, a separate download for real users, is written to
``out/glm-4-voice-tokenizer`` so one folder carries everything a test needs. The folder appears only when
complete: it is written next to ``out`` under a temporary name and renamed at the end.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from tqdm import tqdm

from kimia_edge.export.fileio import finish_staging, staging_dir
from kimia_edge.export.snapshot.presets import check_size


def _writers() -> Dict[str, Callable[[Path, str, int], None]]:
    from kimia_edge.export.snapshot.audio_encoders import GLM_TOKENIZER_SUBDIR, write_vq_encoder, write_whisper_encoder
    from kimia_edge.export.snapshot.detokenizer import write_detokenizer
    from kimia_edge.export.snapshot.llm import write_llm
    from kimia_edge.export.snapshot.vocoder import write_vocoder

    return {
        "llm": write_llm,
        "whisper": write_whisper_encoder,
        "glm_tokenizer": lambda root, size, seed: write_vq_encoder(root / GLM_TOKENIZER_SUBDIR, size, seed),
        "detokenizer": write_detokenizer,
        "vocoder": write_vocoder,
    }


COMPONENTS = ("llm", "whisper", "glm_tokenizer", "detokenizer", "vocoder")
# Written into every generated snapshot: what reads a snapshot (the quantization study) can say its weights are random.
GENERATED_MARKER = "kimia-edge-generated.json"


def is_generated(snapshot: Path) -> bool:
    """True if ``snapshot`` was written by ``make_snapshot`` (random weights), by its marker file."""
    return (Path(snapshot) / GENERATED_MARKER).is_file()


def make_snapshot(out: Path, size: str, seed: int, components: Optional[Iterable[str]] = None) -> Path:
    """Writes a snapshot of ``size`` (one of ``presets.SIZES``) at ``out``; returns ``out``.

    ``components`` limits what is written (default: all of ``COMPONENTS``). Each component gets its own seed
    derived from ``seed``, so writing a subset gives the same tensors as writing everything.
    """
    check_size(size)
    chosen = list(components) if components else list(COMPONENTS)
    unknown = sorted(set(chosen) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    writers = _writers()
    tmp = staging_dir(out)
    try:
        for name in tqdm(chosen, desc=f"snapshot {size}", unit="component"):
            writers[name](tmp, size, seed + COMPONENTS.index(name))
        (tmp / GENERATED_MARKER).write_text(json.dumps({"size": size, "seed": seed, "components": list(chosen),
                                                        "weights": "random"}) + "\n")
        tmp.rename(out)
        finish_staging(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main_make(out: Path, size: str, seed: int, components: Optional[Iterable[str]]) -> int:
    start = time.perf_counter()
    make_snapshot(out, size, seed, components)
    print(f"wrote {size} snapshot to {out}: {folder_bytes(out) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    return 0
