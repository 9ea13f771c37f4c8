"""LLM decode and prefill speed: llama.cpp (each quant) vs the torch reference, and vs the memory-bandwidth bound.

Two parts, each printed as a markdown table with the machine label and the date:

1. ``--small SNAPSHOT`` (widths multiples of 256 so K-quants apply): prefill tokens/s and decode steps/s of
   ``LlamaCppBackend`` for F32, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M vs ``TorchLLMBackend`` fp32 eager, same threads.
2. ``--full-gguf DIR [DIR ...]`` (folders of full-size GGUF exports, e.g. the F16 export and its Q4_K_M): decode
   steps/s per mode vs the bandwidth bound = read bandwidth / bytes read per step, the bandwidth measured right
   before each figure (this machine drifts between ~25 and ~40 GB/s within minutes).

Decode modes (the exact savings of the generation loop):
- full step: both heads (trunk + capture + audio branch + both logits);
- text-only: a ``text_only`` backend (no audio model, no eval callback; ASR / audio QA);
- text ended: the trunk's head skipped (``need_text=False``), the audio branch run.

"ours" = ``LlamaCppBackend.step`` + greedy sampling of every head it returned (embedding rows read from the GGUF,
both models, hand-off, logits, sampling: the loop's whole per-step cost; "w/o sampling" = the backend step alone:
greedy sampling costs ~0.1 ms per head at V = 168448 since the float32 fast path, ~1.3 ms before); "raw" = the same two llama.cpp models
decoding a fixed embedding with the same capture, nothing else (target: ours within 5 % of raw). The two are
measured in alternating rounds so that drift hits both alike; the medians are reported.

Bytes read per step (from the GGUF tensor sizes): every tensor of the trunk but ``token_embd`` (one row per step is
read, ~0) and of the audio model (its ``token_embd`` is the tied head ``mimo_output``), minus the heads a mode skips.

    python bench/llm.py --small /work/snaps/small --work /tmp/llm_bench [--threads 2] [--json out.json]
    python bench/llm.py --full-gguf /path/full_f16 /path/full_q4km [--threads 2]
    python bench/llm.py --callbacks /path/gguf_folder [...] [--threads 2]
    python bench/llm.py --sampler

3. ``--callbacks DIR [DIR ...]``: the hand-off's eval callback in Python (llama.cpp calls it through ctypes for
   every graph node) vs in C++ (``NativeHiddenCapture``, the default), two backends on the same files stepped in
   alternating rounds, per mode, each against the bandwidth bound measured right before the mode. Text-only
   installs no callback; it is listed for the bound (both backends run it the same way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import gguf
import llama_cpp
from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend, LlamaModel, _init_backend, make_capture
from kimia_edge.runtime.sampler import SamplerParams, sample_token
from kimia_edge.runtime.metrics import machine_label

GREEDY = SamplerParams(0.0, 5, 1.0, 16)
SMALL_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
BANDWIDTH_BYTES = 1_500_000_000  # 1.5 GB read per bandwidth probe (>> the 32 MB-class L3 of this machine)
BANDWIDTH_REPEATS = 4            # best of N
MODES = ("full step", "text-only", "text ended")




# --------------------------------------------------------------------------------------------- bandwidth
class BandwidthProbe:
    """Read bandwidth (GB/s): best of N sums over a 1.5 GB float64 array, split over ``threads`` threads (numpy
    releases the GIL in reductions), like a decode step streaming its weights once."""

    def __init__(self, threads: int, nbytes: int = BANDWIDTH_BYTES) -> None:
        self.data = np.ones(nbytes // 8, dtype=np.float64)
        self.parts = np.array_split(self.data, threads)

    def measure(self, repeats: int = BANDWIDTH_REPEATS) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            workers = [threading.Thread(target=np.sum, args=(p,)) for p in self.parts]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t0)
        return self.data.nbytes / best / 1e9


def bytes_per_step(files: Dict[str, Path]) -> Dict[str, int]:
    """Weight bytes read per decode step, per mode (trunk token_embd excluded: one row per step)."""
    def split(path: Path) -> Tuple[int, int]:
        body = head = 0
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name in ("output.weight",) or (t.name == "token_embd.weight" and "audio" in path.name):
                head += int(t.n_bytes)
            elif t.name != "token_embd.weight":
                body += int(t.n_bytes)
        return body, head

    tb, th = split(files["trunk"])
    ab, ah = split(files["audio"])
    return {"full step": tb + th + ab + ah, "text-only": tb + th, "text ended": tb + ab + ah}


# ------------------------------------------------------------------------------------------------ timing
def _timed(fn: Callable[[], None], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _prompt_ids(info, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    audio = rng.integers(info.token_offset, info.vocab_size, n)
    text = rng.integers(1, info.token_offset, n)
    return audio, text


def llamacpp_speeds(files: Dict[str, Path], threads: int, prompt: int, steps: int, rounds: int,
                    probe: Optional[BandwidthProbe] = None, raw: bool = True) -> Dict[str, Dict[str, float]]:
    """Per mode: decode steps/s (ours, and raw for the full step), prefill tokens/s (full model), bandwidth."""
    rng = np.random.default_rng(0)
    n_ctx = prompt + rounds * steps * 2 + 16
    res: Dict[str, Dict[str, float]] = {}
    common = dict(n_ctx=n_ctx, n_threads=threads, n_batch=max(prompt, 32))
    with LlamaCppBackend(files["trunk"], files["audio"], files.get("adaptor"), **common) as be:
        info = be.info
        audio, text = _prompt_ids(info, prompt, rng)
        mask = np.zeros(prompt, bool)
        bw = probe.measure() if probe else float("nan")
        pre = _timed(lambda: be.prefill(audio, text, None, mask), 3)
        res["prefill"] = {"tokens_per_s": prompt / statistics.median(pre), "bandwidth_gbs": bw}

        backend_only: List[float] = []

        def ours(need_text: bool) -> Callable[[], None]:
            def step() -> None:
                t0 = time.perf_counter()
                t, a = be.step(int(rng.integers(info.token_offset, info.vocab_size)), 7, need_text=need_text)
                backend_only.append(time.perf_counter() - t0)
                if t is not None:
                    sample_token(t, GREEDY, rng)
                if a is not None:
                    sample_token(a, GREEDY, rng)
            return step

        raw_fn = None
        if raw:
            ggml = _init_backend()
            cap = make_capture(ggml, f"l_out-{info.fork_layer}", info.hidden_size, common["n_batch"],
                               be.capture.kind)
            trunk = LlamaModel(files["trunk"], capture=cap, n_gpu_layers=0, exact=False, **common)
            mimo = LlamaModel(files["audio"], n_gpu_layers=0, exact=False, **common)
            x = be.embed_inputs(audio, text, None, None)
            trunk.decode(x, 0, True)
            mimo.decode(cap.take(), 0, True)
            step_x = x[-1:].copy()
            raw_pos = [prompt]

            def raw_fn() -> None:
                trunk.decode(step_x, raw_pos[0], True)
                mimo.decode(cap.take(), raw_pos[0], True)
                raw_pos[0] += 1

        for mode, need_text in (("full step", True), ("text ended", False)):
            be.prefill(audio, text, None, mask)
            bw = probe.measure() if probe else float("nan")
            ours_t, raw_t = [], []
            backend_only.clear()
            for r in range(rounds):  # alternate: drift hits both alike
                ours_t += _timed(ours(need_text), steps)
                if raw_fn is not None and mode == "full step":
                    raw_t += _timed(raw_fn, steps)
            res[mode] = {"steps_per_s": 1 / statistics.median(ours_t), "bandwidth_gbs": bw,
                         "backend_steps_per_s": 1 / statistics.median(backend_only)}
            if raw_t:
                res[mode]["raw_steps_per_s"] = 1 / statistics.median(raw_t)
        if raw_fn is not None:
            trunk.close(), mimo.close()
    with LlamaCppBackend(files["trunk"], None, files.get("adaptor"), text_only=True, **common) as be:
        be.prefill(audio, text, None, mask)
        bw = probe.measure() if probe else float("nan")
        t = _timed(lambda: sample_token(be.step(int(rng.integers(info.token_offset, info.vocab_size)), 7)[0],
                                        GREEDY, rng), rounds * steps)
        res["text-only"] = {"steps_per_s": 1 / statistics.median(t), "bandwidth_gbs": bw}
    return res


def torch_speeds(snapshot: Path, threads: int, prompt: int, steps: int) -> Dict[str, Dict[str, float]]:
    """TorchLLMBackend fp32 eager: prefill tokens/s and full decode steps/s (both heads + greedy sampling)."""
    import torch

    from kimia_edge.export.reference.loaders import load_llm
    from kimia_edge.export.reference.llm_backend import TorchLLMBackend

    torch.set_num_threads(threads)
    model = load_llm(snapshot, dtype=torch.float32)
    be = TorchLLMBackend(model)
    cfg = model.config
    rng = np.random.default_rng(0)
    audio = rng.integers(cfg.kimia_token_offset, cfg.vocab_size, prompt)
    text = rng.integers(1, cfg.kimia_token_offset, prompt)
    mask = np.zeros(prompt, bool)
    with torch.inference_mode():
        pre = _timed(lambda: be.prefill(audio, text, None, mask), 3)

        def step() -> None:
            t, a = be.step(int(rng.integers(cfg.kimia_token_offset, cfg.vocab_size)), 7)
            sample_token(t, GREEDY, rng), sample_token(a, GREEDY, rng)

        dec = _timed(step, steps)
    return {"prefill": {"tokens_per_s": prompt / statistics.median(pre)},
            "full step": {"steps_per_s": 1 / statistics.median(dec)}}


def callback_speeds(files: Dict[str, Path], threads: int, prompt: int, steps: int, rounds: int,
                    probe: BandwidthProbe) -> Dict[str, Dict[str, float]]:
    """Per mode: steps/s ("ours": step + greedy sampling) with the Python and with the native eval callback."""
    rng = np.random.default_rng(0)
    common = dict(n_ctx=prompt + rounds * steps + 16, n_threads=threads, n_batch=max(prompt, 32))
    kinds = ("python", "native")
    res: Dict[str, Dict[str, float]] = {}
    bes = {}
    try:
        for kind in kinds:
            bes[kind] = LlamaCppBackend(files["trunk"], files["audio"], files.get("adaptor"), eval_callback=kind,
                                        **common)
            assert bes[kind].capture.kind == kind
        info = bes["native"].info
        audio, text = _prompt_ids(info, prompt, rng)
        mask = np.zeros(prompt, bool)

        def step_fn(be: LlamaCppBackend, need_text: bool) -> Callable[[], None]:
            def step() -> None:
                t, a = be.step(int(rng.integers(info.token_offset, info.vocab_size)), 7, need_text=need_text)
                if t is not None:
                    sample_token(t, GREEDY, rng)
                if a is not None:
                    sample_token(a, GREEDY, rng)
            return step

        for mode, need_text in (("full step", True), ("text ended", False)):
            for be in bes.values():
                be.prefill(audio, text, None, mask)
            bw = probe.measure()
            times: Dict[str, List[float]] = {k: [] for k in kinds}
            for _ in range(rounds):  # alternate: drift hits both alike
                for kind in kinds:
                    times[kind] += _timed(step_fn(bes[kind], need_text), steps)
            res[mode] = {"bandwidth_gbs": bw, **{k: 1 / statistics.median(v) for k, v in times.items()}}
    finally:
        for be in bes.values():
            be.close()
    with LlamaCppBackend(files["trunk"], None, files.get("adaptor"), text_only=True, **common) as be:
        be.prefill(audio, text, None, mask)
        bw = probe.measure()
        t = _timed(lambda: sample_token(be.step(int(rng.integers(info.token_offset, info.vocab_size)), 7)[0],
                                        GREEDY, rng), rounds * steps)
        sps = 1 / statistics.median(t)
        res["text-only"] = {"bandwidth_gbs": bw, "python": sps, "native": sps}
    return res


def callback_cost(files: Dict[str, Path], threads: int, prompt: int, steps: int, rounds: int) -> Dict[str, float]:
    """The callback alone: ms per one-position trunk decode with no callback, the Python one and the native one
    (alternating rounds, medians), and the graph nodes llama.cpp asks the callback about per decode."""
    ggml = _init_backend()
    common = dict(n_ctx=prompt + 3 * rounds * steps + 16, n_threads=threads, n_batch=max(prompt, 32), n_gpu_layers=0,
                  exact=False)
    with LlamaCppBackend(files["trunk"], None, None, text_only=True, n_ctx=64, n_threads=threads) as be:
        info = be.info
        x = be.embed_inputs(*_prompt_ids(info, prompt, np.random.default_rng(0)), None, None)
    name = f"l_out-{info.fork_layer}"
    models = {"none": LlamaModel(files["trunk"], **common)}
    for kind in ("python", "native"):
        models[kind] = LlamaModel(files["trunk"], capture=make_capture(ggml, name, info.hidden_size,
                                                                       common["n_batch"], kind), **common)
    asked = [0]
    counter = make_capture(ggml, name, info.hidden_size, common["n_batch"], "python")
    inner = counter._on_eval

    def counting(tensor, ask, user_data):
        asked[0] += bool(ask)
        return inner(tensor, ask, user_data)

    counter.callback = llama_cpp.ggml_backend_sched_eval_callback(counting)
    models["count"] = LlamaModel(files["trunk"], capture=counter, **common)
    try:
        pos = {}
        for k, m in models.items():
            m.decode(x, 0, False)
            if m.capture is not None:
                m.capture.take()
            pos[k] = prompt
        asked[0] = 0
        models["count"].decode(x[-1:], prompt, True)
        nodes = asked[0]
        times: Dict[str, List[float]] = {k: [] for k in ("none", "python", "native")}
        for _ in range(rounds):
            for k in times:
                m = models[k]

                def one() -> None:
                    m.decode(x[-1:], pos[k], True)
                    if m.capture is not None:
                        m.capture.take()
                    pos[k] += 1
                times[k] += _timed(one, steps)
        out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
        out["nodes_asked"] = nodes
        return out
    finally:
        for m in models.values():
            m.close()


def bench_callbacks(folders: Sequence[Path], threads: int, prompt: int, steps: int, rounds: int) -> Dict:
    probe = BandwidthProbe(threads)
    out = {}
    for folder in folders:
        files = _files(folder)
        r = callback_speeds(files, threads, prompt, steps, rounds, probe)
        r["trunk_decode"] = callback_cost(files, threads, prompt, steps, rounds)
        r["bytes_per_step"] = bytes_per_step(files)
        out[folder.name] = r
        print(f"  {folder.name}: {json.dumps(r)}", file=sys.stderr)
    return out


def _mode_bound(r: Dict, mode: str) -> Tuple[Dict[str, float], float, float]:
    """(the mode's figures, GB read per step, bound steps/s = the bandwidth measured before it / GB per step)."""
    m = r[mode]
    gb = r["bytes_per_step"][mode] / 1e9
    return m, gb, m["bandwidth_gbs"] / gb


def callbacks_table(rows: Dict, threads: int, prompt: int, steps: int, rounds: int) -> str:
    lines = [f"Eval callback: Python vs native (C++), {threads} threads, prompt {prompt}, {rounds} alternating rounds "
             f"of {steps} steps (medians); {machine_label()}; {datetime.date.today().isoformat()}. Bound = bandwidth "
             f"/ bytes read per step, bandwidth measured right before each mode.", "",
             "| model | mode | GB read / step | bandwidth GB/s | bound step/s | Python cb step/s | % of bound "
             "| native cb step/s | % of bound | native / Python |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        for mode in MODES:
            m, gb, bound = _mode_bound(r, mode)
            note = " (no callback)" if mode == "text-only" else ""
            lines.append(f"| {name} | {mode}{note} | {gb:.3f} | {m['bandwidth_gbs']:.1f} | {bound:.1f} | "
                         f"{m['python']:.2f} | {100 * m['python'] / bound:.0f} % | {m['native']:.2f} | "
                         f"{100 * m['native'] / bound:.0f} % | {m['native'] / m['python']:.3f} |")
    lines += ["", "The callback alone: one-position trunk decode (text head included), median ms, alternating rounds.", "",
              "| model | graph nodes asked / decode | no callback ms | Python cb ms | native cb ms | Python cb cost ms "
              "| native cb cost ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        d = r["trunk_decode"]
        lines.append(f"| {name} | {d['nodes_asked']} | {d['none_ms']:.2f} | {d['python_ms']:.2f} | "
                     f"{d['native_ms']:.2f} | {d['python_ms'] - d['none_ms']:+.2f} | {d['native_ms'] - d['none_ms']:+.2f} |")
    return "\n".join(lines)


def sampler_table(vocab: int = 168448, repeats: int = 300) -> str:
    """ms per sample_token on one [vocab] float32 vector: the fast paths vs the full-vocabulary reference steps."""
    x = (np.random.default_rng(0).standard_normal(vocab) * 3).astype(np.float32)
    lines = [f"Sampler, one head, V = {vocab}, median of {repeats}; {machine_label()}; "
             f"{datetime.date.today().isoformat()}.", "", "| params | fast ms | reference ms | reference / fast |",
             "|---|---:|---:|---:|"]
    for label, params in (("greedy", GREEDY), ("T 0.8, top-k 5", SamplerParams(0.8, 5, 1.0, 16))):
        ms = {}
        for fast in (True, False):
            rng = np.random.default_rng(1)
            ms[fast] = 1e3 * statistics.median(_timed(lambda: sample_token(x, params, rng, fast=fast), repeats))
        lines.append(f"| {label} | {ms[True]:.3f} | {ms[False]:.3f} | {ms[False] / ms[True]:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- parts
def _files(folder: Path) -> Dict[str, Path]:
    out = {"trunk": folder / "llm_trunk.gguf", "audio": folder / "llm_audio.gguf"}
    if (folder / "llm_adaptor.gguf").exists():
        out["adaptor"] = folder / "llm_adaptor.gguf"
    return out


def bench_small(snapshot: Path, work: Path, threads: int, prompt: int, steps: int, rounds: int) -> Dict:
    from kimia_edge.export.gguf_export import export_llm_gguf
    from kimia_edge.export.gguf_quantize import quantize_llm

    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "F32"
    if not (f32 / "llm_trunk.gguf").exists():
        export_llm_gguf(snapshot, f32, "f32")
    rows: Dict[str, Dict] = {}
    rows["torch fp32 eager"] = torch_speeds(snapshot, threads, prompt, steps * rounds)
    for name in ("F32",) + SMALL_QUANTS:
        folder = work / name
        if not (folder / "llm_trunk.gguf").exists():
            quantize_llm(f32, folder, name)
        rows[name] = llamacpp_speeds(_files(folder), threads, prompt, steps, rounds)
        rows[name]["bytes_per_step"] = bytes_per_step(_files(folder))
        print(f"  {name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'bytes_per_step'})}",
              file=sys.stderr)
    return rows


def small_table(rows: Dict, threads: int, prompt: int) -> str:
    torch_step = rows["torch fp32 eager"]["full step"]["steps_per_s"]
    torch_pre = rows["torch fp32 eager"]["prefill"]["tokens_per_s"]
    lines = [f"Small snapshot, {threads} threads, prompt {prompt} positions; {machine_label()}; "
             f"{datetime.date.today().isoformat()}.", "",
             "| model | prefill tok/s | full step/s | x torch | raw 2-model step/s | ours / raw | ours w/o sampling "
             "/ raw | text-only step/s | text ended step/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        full = r["full step"]["steps_per_s"]
        cells = f"| {name} | {r['prefill']['tokens_per_s']:.0f} | {full:.1f} | {full / torch_step:.2f} |"
        if "text-only" not in r:  # torch: one mode only
            lines.append(cells + " | | | | |")
            continue
        raw = r["full step"]["raw_steps_per_s"]
        lines.append(cells + f" {raw:.1f} | {full / raw:.3f} | {r['full step']['backend_steps_per_s'] / raw:.3f} | "
                             f"{r['text-only']['steps_per_s']:.1f} | {r['text ended']['steps_per_s']:.1f} |")
    lines.append("")
    lines.append(f"torch prefill {torch_pre:.0f} tok/s.")
    return "\n".join(lines)


def bench_full(folders: Sequence[Path], threads: int, prompt: int, steps: int, rounds: int) -> Dict:
    probe = BandwidthProbe(threads)
    out = {}
    for folder in folders:
        files = _files(folder)
        r = llamacpp_speeds(files, threads, prompt, steps, rounds, probe=probe)
        r["bytes_per_step"] = bytes_per_step(files)
        out[folder.name] = r
        print(f"  {folder.name}: {json.dumps(r)}", file=sys.stderr)
    return out


def full_table(rows: Dict, threads: int, prompt: int) -> str:
    lines = [f"Full-size random-weight LLM (hidden 3584, 28 + 6 layers, vocab 168448), {threads} threads, "
             f"prompt {prompt}; {machine_label()}; {datetime.date.today().isoformat()}. Bound = bandwidth / bytes "
             f"read per step, bandwidth measured right before each figure.", "",
             "| model | mode | GB read / step | bandwidth GB/s | bound step/s | measured step/s | % of bound "
             "| raw 2-model step/s | ours / raw | ours w/o sampling / raw |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        for mode in MODES:
            m, gb, bound = _mode_bound(r, mode)
            steps = m["steps_per_s"]
            raw = m.get("raw_steps_per_s")
            raw_cells = ("| | | |" if raw is None else
                         f"| {raw:.2f} | {steps / raw:.3f} | {m['backend_steps_per_s'] / raw:.3f} |")
            lines.append(f"| {name} | {mode} | {gb:.2f} | {m['bandwidth_gbs']:.1f} | {bound:.2f} | {steps:.2f} | "
                         f"{100 * steps / bound:.0f} % {raw_cells}")
        lines.append(f"| {name} | prefill | | {r['prefill']['bandwidth_gbs']:.1f} | | "
                     f"{r['prefill']['tokens_per_s']:.1f} tok/s | | | | |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="LLM decode / prefill speed vs torch and vs the bandwidth bound")
    p.add_argument("--small", type=Path, help="small snapshot folder")
    p.add_argument("--work", type=Path, default=Path("llm_bench"), help="folder for the small GGUFs")
    p.add_argument("--full-gguf", type=Path, nargs="*", default=[], help="full-size GGUF export folders")
    p.add_argument("--callbacks", type=Path, nargs="*", default=[],
                   help="GGUF export folders: Python vs native eval callback, side by side")
    p.add_argument("--sampler", action="store_true", help="sampler fast paths vs the reference steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    report: Dict = {"machine": machine_label(), "date": datetime.date.today().isoformat(), "threads": a.threads,
                    "prompt": a.prompt}
    if a.small:
        report["small"] = bench_small(a.small, a.work, a.threads, a.prompt, a.steps, a.rounds)
        print(small_table(report["small"], a.threads, a.prompt))
        print()
    if a.full_gguf:
        report["full"] = bench_full(a.full_gguf, a.threads, a.prompt, a.steps, a.rounds)
        print(full_table(report["full"], a.threads, a.prompt))
    if a.sampler:
        print(sampler_table())
        print()
    if a.callbacks:
        report["callbacks"] = bench_callbacks(a.callbacks, a.threads, a.prompt, a.steps, a.rounds)
        print(callbacks_table(report["callbacks"], a.threads, a.prompt, a.steps, a.rounds))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
