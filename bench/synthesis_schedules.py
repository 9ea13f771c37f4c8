"""Synthesis pipelining and chunk schedules ([H] #14 items 3-4), on a bundle's DiT step and vocoder graphs.

``pipelining``: the streaming detokenizer serial (today) vs pipelined (vocoder of chunk k on a worker thread beside
the DiT of chunk k+1) for several intra-op thread splits, interleaved rounds (each configuration once per round,
medians), every token available at once (synthesis-bound, as when the LLM runs ahead). Reports synthesis RTF,
first audio and whether the samples equal the serial ones bit for bit.

``schedules``: one long stream (``--tokens``, >= 750 = 60 s) per named schedule (runtime/spec/streaming.py
SCHEDULES), same tokens and noise seed, every chunk timed; plus the official schedule with another noise seed (the
spread between two equally valid samples, the floor any schedule difference is to be read against). Reports first
audio, the player stalls simulated from the measured per-chunk times and at modelled synthesis RTFs, and the
quality against the official schedule with the study's metrics (quantization/study/metrics.py) per 2.4 s window
and over the whole wav. ``--plot`` writes the PNG (error per window over time; first audio and stalls per RTF).

    python bench/synthesis_schedules.py pipelining --bundle B [--bundle B2] [--tokens 100] [--repeats 3]
    python bench/synthesis_schedules.py schedules --bundle B --tokens 800 [--plot docs/synthesis_schedules.png]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from kimia_edge.quantization.study.metrics import (log_spectral_distance_log, mel_l1, multi_resolution_stft_distance,
                                                   snr_db)
from kimia_edge.runtime.bundle import read_manifest
from kimia_edge.runtime.detokenizer import StreamingDetokenizer, WaveChunk
from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
from kimia_edge.runtime.metrics import machine_label
from kimia_edge.runtime.sessions import open_session
from kimia_edge.runtime.spec.streaming import SCHEDULES, StreamingConfig, schedule_overrides
from kimia_edge.runtime.synthesis_pipeline import SynthesisPipeline

SAMPLE_RATE_HZ = 24_000
TOKEN_RATE_HZ = 12.5
WINDOW_S = 2.4          # quality windows: one official chunk of speech
MODEL_RTFS = (0.5, 0.8, 1.0, 1.2)


# ---- the player model (pure; tests/test_synthesis_schedules.py) ----------------------------------------------------
@dataclass(frozen=True)
class Playback:
    """What a listener gets: ``first_audio_s`` (first chunk ready), ``stalls`` (times the player ran dry after the
    first audio, waiting for the next chunk), ``stall_s`` (total silence inserted)."""

    first_audio_s: float
    stalls: int
    stall_s: float


def simulate_playback(ready_s: Sequence[float], audio_s: Sequence[float], tolerance_s: float = 1e-9) -> Playback:
    """A player that starts when chunk 0 is ready and plays chunks back to back: chunk k starts at
    max(ready_k, end of chunk k-1); it stalls once for every chunk that is not ready when the previous one ends.
    ``ready_s`` [n] seconds since the start (non-decreasing), ``audio_s`` [n] seconds of audio per chunk."""
    if len(ready_s) != len(audio_s) or not len(ready_s):
        raise ValueError(f"ready_s / audio_s: expected the same non-zero length, got {len(ready_s)}, {len(audio_s)}")
    end = ready_s[0] + audio_s[0]
    stalls, stall_s = 0, 0.0
    for ready, length in zip(ready_s[1:], audio_s[1:]):
        if ready > end + tolerance_s:
            stalls += 1
            stall_s += ready - end
            end = ready
        end += length
    return Playback(float(ready_s[0]), stalls, float(stall_s))


def modelled_ready_times(frames_in: Sequence[int], rtf: float, reference_frames: Sequence[int],
                         reference_audio_s: float) -> List[float]:
    """Ready times when a chunk costs time in proportion to the frames its DiT sees (look-ahead included), at the
    rate that gives the *reference* schedule synthesis RTF ``rtf``: seconds per frame = rtf · reference audio /
    reference frames. A schedule with more, smaller chunks recomputes more look-ahead and so comes out slower."""
    per_frame = rtf * reference_audio_s / float(sum(reference_frames))
    return list(np.cumsum(np.asarray(frames_in, dtype=np.float64) * per_frame))


# ---- running the detokenizer ---------------------------------------------------------------------------------------
def open_nets(bundle: Path, precision: str, dit_threads: int, vocoder_threads: int):
    manifest = read_manifest(bundle)
    dit = manifest.model.dit
    step = OnnxDitStep(open_session(bundle, manifest.artifact("dit_step", precision), device="cpu",
                                    threads=dit_threads), dit.depth, dit.num_heads, dit.head_dim)
    vocoder = OnnxVocoder(open_session(bundle, manifest.artifact("vocoder", "fp32"), device="cpu",
                                       threads=vocoder_threads))
    return step, vocoder, manifest.model


def stream(step, vocoder, model, streaming: StreamingConfig, tokens: np.ndarray, seed: int, pipelined: bool
           ) -> Dict[str, object]:
    """All ``tokens`` pushed at once; every chunk's (ready time, samples, DiT frames, mel) recorded."""
    det = StreamingDetokenizer(step, vocoder, streaming, model.dit, noise=np.random.default_rng(seed))
    chunks: List[Tuple[float, WaveChunk]] = []
    start = time.perf_counter()
    sink = lambda c: chunks.append((time.perf_counter() - start, c))  # noqa: E731
    if pipelined:
        with SynthesisPipeline(det, sink) as pipe:
            pipe.push(tokens)
            pipe.finish()
    else:
        for c in det.push(tokens):
            sink(c)
        for c in det.finish():
            sink(c)
    total = time.perf_counter() - start
    wav = np.concatenate([c.wav for _, c in chunks])
    first = next(t for t, c in chunks if len(c.wav))
    return {"seconds": total, "rtf": total / (len(wav) / SAMPLE_RATE_HZ), "first_audio_s": first, "wav": wav,
            "mel": np.concatenate([c.mel for _, c in chunks]), "ready_s": [t for t, _ in chunks],
            "audio_s": [len(c.wav) / SAMPLE_RATE_HZ for _, c in chunks]}


def dit_frames(streaming: StreamingConfig, n_tokens: int) -> List[int]:
    """Frames the DiT sees per chunk (consumed tokens + carried look-ahead) for ``n_tokens`` pushed at once."""
    out, used, index, carry = [], 0, 0, 0
    while used < n_tokens:
        size = streaming.chunk_tokens_at(index)
        final = n_tokens - used <= size
        size = n_tokens - used if final else size
        frames = (size * streaming.upsample_factor) + carry
        out.append(frames)
        carry = 0 if final else min(streaming.look_ahead_tokens, frames // streaming.upsample_factor // 2) * \
            streaming.upsample_factor
        used += size
        index += 1
    return out


# ---- parts ---------------------------------------------------------------------------------------------------------
PIPELINE_CONFIGS = (("serial, DiT 2 + vocoder 2 threads", False, 2, 2),
                    ("pipelined, DiT 2 + vocoder 2 threads", True, 2, 2),
                    ("pipelined, DiT 1 + vocoder 1 thread", True, 1, 1),
                    ("pipelined, DiT 2 + vocoder 1 thread", True, 2, 1),
                    ("serial, DiT 1 + vocoder 1 thread", False, 1, 1))


def pipelining(args: argparse.Namespace) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for bundle in args.bundle:
        nets = {(d, v): open_nets(bundle, args.precision, d, v) for _, _, d, v in PIPELINE_CONFIGS}
        model = next(iter(nets.values()))[2]
        streaming = StreamingConfig.from_dict(model.streaming.to_dict())
        tokens = np.random.default_rng(0).integers(0, model.dit.semantic_vocab_size, args.tokens)
        runs: Dict[str, List[Dict[str, object]]] = {name: [] for name, *_ in PIPELINE_CONFIGS}
        for _ in range(args.repeats):
            for name, piped, d, v in PIPELINE_CONFIGS:
                step, vocoder, _ = nets[(d, v)]
                runs[name].append(stream(step, vocoder, model, streaming, tokens, 1, piped))
        serial = {(d, v): runs[name][0]["wav"] for name, piped, d, v in PIPELINE_CONFIGS if not piped}
        base = statistics.median(r["rtf"] for r in runs[PIPELINE_CONFIGS[0][0]])
        rows = {}
        for name, piped, d, v in PIPELINE_CONFIGS:
            rtf = statistics.median(r["rtf"] for r in runs[name])
            ref = serial.get((d, v))
            rows[name] = {"rtf": rtf, "first_audio_s": statistics.median(r["first_audio_s"] for r in runs[name]),
                          "speedup": base / rtf,
                          "same_as_serial": None if ref is None else all(np.array_equal(ref, r["wav"])
                                                                         for r in runs[name]),
                          "same_as_serial_2x2": all(np.array_equal(serial[(2, 2)], r["wav"]) for r in runs[name])}
        out[str(bundle)] = {"rows": rows, "audio_s": float(runs[PIPELINE_CONFIGS[0][0]][0]["wav"].size
                                                           / SAMPLE_RATE_HZ)}
        print(f"\n{bundle} (DiT {args.precision}, vocoder fp32), {args.tokens} tokens = "
              f"{out[str(bundle)]['audio_s']:.1f} s, median of {args.repeats} interleaved rounds")
        print("| configuration | synthesis RTF | vs serial 2+2 | first audio (s) | samples = serial (same threads) "
              "| = serial 2+2 |")
        print("|---|---:|---:|---:|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['rtf']:.3f} | {r['speedup']:.2f}x | {r['first_audio_s']:.3f} | "
                  f"{'-' if r['same_as_serial'] is None else r['same_as_serial']} | {r['same_as_serial_2x2']} |")
    return out


def window_metrics(ref: Dict[str, object], run: Dict[str, object], frames_per_window: int) -> List[Dict[str, float]]:
    """mel L1, log-spectral distance (dB) and wav SNR (dB) against ``ref`` per window of ``frames_per_window``."""
    samples = frames_per_window * SAMPLE_RATE_HZ // 50
    out = []
    n = min(len(ref["mel"]), len(run["mel"])) // frames_per_window
    for w in range(n):
        a, b = slice(w * frames_per_window, (w + 1) * frames_per_window), slice(w * samples, (w + 1) * samples)
        out.append({"t_s": w * WINDOW_S, "mel_l1": mel_l1(ref["mel"][a], run["mel"][a]),
                    "lsd_db": log_spectral_distance_log(ref["mel"][a], run["mel"][a]),
                    "snr_db": snr_db(ref["wav"][b], run["wav"][b])})
    return out


def schedules(args: argparse.Namespace) -> Dict[str, object]:
    (bundle,) = args.bundle
    step, vocoder, model = open_nets(bundle, args.precision, args.threads, args.threads)
    base = StreamingConfig.from_dict(model.streaming.to_dict())
    tokens = np.random.default_rng(0).integers(0, model.dit.semantic_vocab_size, args.tokens)
    configs = {name: StreamingConfig.from_dict({**base.to_dict(), **schedule_overrides(name)}) for name in SCHEDULES}
    runs = {name: stream(step, vocoder, model, cfg, tokens, 1, args.pipelined) for name, cfg in configs.items()}
    runs["official, other noise seed"] = stream(step, vocoder, model, configs["official"], tokens, 2, args.pipelined)
    ref = runs["official"]
    audio_s = ref["wav"].size / SAMPLE_RATE_HZ
    frames = {name: dit_frames(configs[name], args.tokens) for name in SCHEDULES}
    frames_per_window = int(round(WINDOW_S * 50))
    result: Dict[str, object] = {"audio_s": audio_s, "schedules": {}}
    print(f"\n{bundle} (DiT {args.precision}), {args.tokens} tokens = {audio_s:.1f} s, noise seed 1, "
          f"{'pipelined' if args.pipelined else 'serial'}, {args.threads} threads per session")
    print("| schedule | chunks | first audio (s) | RTF | stalls (measured) | " +
          " | ".join(f"stalls / s silent at RTF {r}" for r in MODEL_RTFS) + " | mel L1 | LSD (dB) | wav SNR (dB) | "
          "MR-STFT |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(MODEL_RTFS) + "---:|---:|---:|---:|")
    for name, run in runs.items():
        cfg_name = "official" if name not in SCHEDULES else name
        measured = simulate_playback(run["ready_s"], run["audio_s"])
        modelled = {r: simulate_playback(modelled_ready_times(frames[cfg_name], r, frames["official"], audio_s),
                                         run["audio_s"]) for r in MODEL_RTFS}
        n = min(ref["wav"].size, run["wav"].size)
        windows = window_metrics(ref, run, frames_per_window)
        whole = {"mel_l1": mel_l1(ref["mel"], run["mel"]), "lsd_db": log_spectral_distance_log(ref["mel"], run["mel"]),
                 "snr_db": snr_db(ref["wav"][:n], run["wav"][:n]),
                 "mrstft": multi_resolution_stft_distance(ref["wav"][:n], run["wav"][:n])["total"]}
        result["schedules"][name] = {
            "chunks": len(run["ready_s"]), "first_audio_s": run["first_audio_s"], "rtf": run["rtf"],
            "measured": measured.__dict__, "modelled": {str(r): p.__dict__ for r, p in modelled.items()},
            "modelled_first_audio_s": {str(r): p.first_audio_s for r, p in modelled.items()},
            "whole": whole, "windows": windows, "chunk_seconds": list(np.diff([0.0] + run["ready_s"])),
            "samples": int(run["wav"].size)}
        print(f"| {name} | {len(run['ready_s'])} | {run['first_audio_s']:.3f} | {run['rtf']:.3f} | "
              f"{measured.stalls} ({measured.stall_s:.2f} s) | " +
              " | ".join(f"{p.stalls} / {p.stall_s:.2f}" for p in modelled.values()) +
              f" | {whole['mel_l1']:.4f} | {whole['lsd_db']:.3f} | {whole['snr_db']:.2f} | {whole['mrstft']:.4f} |")
    if args.plot:
        plot(result, args.plot, f"{bundle.name}, {machine_label()}")
        print(f"wrote {args.plot}")
    return result


def plot(result: Dict[str, object], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in result["schedules"].items():
        if name == "official":
            continue
        w = r["windows"]
        ax1.plot([x["t_s"] for x in w], [x["lsd_db"] for x in w], marker=".", lw=1, label=name)
    ax1.set_xlabel("speech time (s), 2.4 s windows")
    ax1.set_ylabel("log-spectral distance to official (dB)")
    ax1.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    names = [n for n in result["schedules"] if n in SCHEDULES]
    x = np.arange(len(MODEL_RTFS))
    for i, name in enumerate(names):
        m = result["schedules"][name]["modelled"]
        ax2.bar(x + (i - 1) * 0.27, [m[str(r)]["first_audio_s"] for r in MODEL_RTFS], 0.27, label=name)
        ax3.bar(x + (i - 1) * 0.27, [m[str(r)]["stall_s"] for r in MODEL_RTFS], 0.27, label=name)
    for ax, ylabel in ((ax2, "first audio (s)"), (ax3, "silence from stalls (s)")):
        ax.set_xticks(x, [f"RTF {r}" for r in MODEL_RTFS])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax3.set_title(f"over {result['audio_s']:.0f} s of speech (modelled)", fontsize=9)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["pipelining", "schedules"])
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--precision", default="fp32", help="DiT step variant (the vocoder runs fp32)")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="schedules: intra-op threads per session")
    parser.add_argument("--pipelined", action="store_true", help="schedules: run them pipelined")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"machine: {machine_label()}; load average {' '.join(load)} at the start")
    result = pipelining(args) if args.part == "pipelining" else schedules(args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "load": load, "result": result}, indent=1,
                                        default=float))


if __name__ == "__main__":
    main()
