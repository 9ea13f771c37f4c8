"""Streaming detokenizer + vocoder: the runtime (ONNX DiT step + ONNX vocoder, host Euler loop) vs the golden
torch pipeline on the same tokens and noise, side by side in one run.

Reports: first-audio latency (first tokens pushed -> first samples out) and detokenizer+vocoder RTF for both;
first-audio latency with the official 30-token first chunk vs a 10-token one; per-chunk cost after ~10 s vs
after ~5 min of generated speech (the KV window caps at 900 frames, so it must stay flat).

    python bench/streaming.py --snapshot /work/snaps/small [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from kimia_edge.export.graphs.base import export_graph
from kimia_edge.export.graphs.dit_step import DitStepGraph
from kimia_edge.export.graphs.vocoder import VocoderGraph
from kimia_edge.export.reference.dit import TorchDitStep
from kimia_edge.runtime.detokenizer import StreamingDetokenizer
from kimia_edge.runtime.dit_config import StreamingConfig
from kimia_edge.runtime.dit_onnx import OnnxDitStep, OnnxVocoder
from kimia_edge.runtime.sessions import open_file_session
from kimia_edge.runtime.metrics import machine_label

SAMPLE_RATE_HZ = 24_000
TOKEN_RATE_HZ = 12.5




def torch_vocoder(module):
    def vocode(mel: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(mel.T[None], np.float32)))[0, 0].numpy()
    return vocode


def run_stream(step, vocoder, cfg, streaming: StreamingConfig, tokens: np.ndarray, seed: int) -> Dict[str, float]:
    """Pushes tokens as the LLM would (one at a time) and times every emitted chunk."""
    det = StreamingDetokenizer(step, vocoder, streaming, cfg, noise=np.random.default_rng(seed))
    start = time.perf_counter()
    first, samples, chunk_s, last = None, 0, [], start
    for tok in tokens:
        for chunk in det.push([int(tok)]):
            now = time.perf_counter()
            chunk_s.append(now - last)
            last = now
            if first is None and len(chunk.wav):
                first = now - start
            samples += len(chunk.wav)
    for chunk in det.finish():
        samples += len(chunk.wav)
    total = time.perf_counter() - start
    return {"first_audio_s": first or total, "rtf": total / (samples / SAMPLE_RATE_HZ), "chunk_s": chunk_s,
            "audio_s": samples / SAMPLE_RATE_HZ}


def chunk_cost(step, cfg, prefix: int, frames: int, evals: int, repeats: int) -> float:
    """Median seconds of one chunk's network work at a given cached-prefix length (evals = Euler steps + priming)."""
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((cfg.depth, 1, cfg.num_heads, prefix, cfg.head_dim)).astype(np.float32)
    x = rng.standard_normal((1, frames, cfg.input_size)).astype(np.float32)
    tok = rng.integers(0, cfg.semantic_vocab_size, (1, frames))
    pos = np.arange(prefix, prefix + frames)[None]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(evals):
            step(x, np.array([k * 34]), tok, pos, kv, kv)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100, help="semantic tokens per utterance (100 = 8 s of speech)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dit_spec, voc_spec = DitStepGraph(), VocoderGraph()
    dit, voc = dit_spec.build(args.snapshot), voc_spec.build(args.snapshot)
    cfg = dit.cfg
    with tempfile.TemporaryDirectory() as tmp:
        export_graph(dit_spec, dit, Path(tmp) / "dit_step.onnx")
        export_graph(voc_spec, voc, Path(tmp) / "vocoder.onnx")
        onnx_step = OnnxDitStep(open_file_session(Path(tmp) / "dit_step.onnx", args.threads), cfg.depth, cfg.num_heads, cfg.head_dim)
        onnx_voc = OnnxVocoder(open_file_session(Path(tmp) / "vocoder.onnx", args.threads))
        torch_step, torch_voc = TorchDitStep(dit.dit), torch_vocoder(voc)
        tokens = np.random.default_rng(0).integers(0, cfg.semantic_vocab_size, args.tokens)

        official = StreamingConfig()
        rows = {}
        for name, step, vocoder in (("runtime (ONNX)", onnx_step, onnx_voc), ("golden (torch)", torch_step, torch_voc)):
            runs = [run_stream(step, vocoder, cfg, official, tokens, seed=1) for _ in range(args.repeats)]
            rows[name] = {"first_audio_s": statistics.median(r["first_audio_s"] for r in runs),
                          "rtf": statistics.median(r["rtf"] for r in runs), "audio_s": runs[0]["audio_s"]}
        small_first = StreamingConfig(first_chunk_tokens=10)
        first10 = statistics.median(run_stream(onnx_step, onnx_voc, cfg, small_first, tokens, 1)["first_audio_s"]
                                    for _ in range(args.repeats))

        frames = official.chunk_tokens * official.upsample_factor + official.look_ahead_tokens * official.upsample_factor
        evals = official.ode_time_points  # 29 Euler evaluations + the priming pass
        # after ~10 s of speech (125 tokens = 500 emitted frames) the cache holds 500 frames; from ~18 s on, 900
        cost_10s = chunk_cost(onnx_step, cfg, 500, frames, evals, args.repeats)
        cost_5min = chunk_cost(onnx_step, cfg, official.max_kv_cache_frames, frames, evals, args.repeats)

    rt, gd = rows["runtime (ONNX)"], rows["golden (torch)"]
    print(f"machine: {machine_label()}; {args.threads} threads; snapshot {args.snapshot} "
          f"(DiT hidden {cfg.hidden_size}, depth {cfg.depth}); {args.tokens} tokens = {rt['audio_s']:.1f} s of speech\n")
    print("| path | first audio (s) | detokenizer+vocoder RTF |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['first_audio_s']:.3f} | {r['rtf']:.3f} |")
    print(f"\nruntime vs golden: {gd['rtf'] / rt['rtf']:.2f}x faster (RTF), first audio {gd['first_audio_s'] / rt['first_audio_s']:.2f}x sooner")
    print(f"first audio, runtime: 30-token first chunk {rt['first_audio_s']:.3f} s, 10-token first chunk {first10:.3f} s "
          f"({100 * first10 / rt['first_audio_s']:.0f} % of official)")
    print(f"per-chunk network cost, runtime: cache of 500 frames (~10 s in) {cost_10s:.3f} s, full 900-frame window "
          f"(any time after ~18 s, incl. 5 min) {cost_5min:.3f} s: {cost_5min / cost_10s:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_label(), "threads": args.threads, "rows": rows,
                                         "first_audio_10_token_s": first10, "chunk_cost_10s": cost_10s,
                                         "chunk_cost_5min": cost_5min}, indent=2))


if __name__ == "__main__":
    main()
