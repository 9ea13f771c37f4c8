"""``kimia-edge selfcheck``: proves on this machine that the run-time stack is usable."""
from __future__ import annotations

import platform
from typing import Callable, List, Tuple

import numpy as np


def _check_rings() -> str:
    from kimia_edge.runtime.rings import AudioRing

    ring = AudioRing(4800, "block")
    block = np.arange(480, dtype=np.float32)
    ring.write(block)
    out = np.empty(480, dtype=np.float32)
    if ring.read_into_nowait(out) != 480 or not np.array_equal(out, block):
        raise RuntimeError("ring round-trip returned different samples")
    return "AudioRing round-trip ok"


def _check_onnxruntime() -> str:
    import onnxruntime as ort

    return f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def _check_llama_cpp() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}, GPU offload {'yes' if llama_cpp.llama_supports_gpu_offload() else 'no'}"


def _check_sound() -> str:
    import sounddevice as sd
    import soundfile as sf

    devices = sd.query_devices()
    return f"PortAudio {sd.get_portaudio_version()[1]}, {len(devices)} device(s); libsndfile {sf.__libsndfile_version__}"


CHECKS: List[Tuple[str, Callable[[], str]]] = [
    ("native rings", _check_rings),
    ("onnxruntime", _check_onnxruntime),
    ("llama.cpp", _check_llama_cpp),
    ("audio I/O", _check_sound),
]


def run_selfcheck() -> int:
    """Prints one line per run-time component; returns 0 if all work, 1 otherwise."""
    from kimia_edge import __version__

    print(f"kimia-edge {__version__} on {platform.machine()} / Python {platform.python_version()}")
    failed = 0
    for name, check in CHECKS:
        try:
            detail, status = check(), "ok"
        except Exception as exc:  # report every failure, not just the first
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            failed += 1
        print(f"  {name:<14} {status:<5} {detail}")
    return 1 if failed else 0
