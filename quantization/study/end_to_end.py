"""End-to-end cells: one chat turn of the whole torch-free ``Pipeline`` per (variant mix, clip), compared with the
golden pipeline's turn on the same clip (greedy, the same sampler seed, the same detokenizer noise).

A mix is written ``e2e:ONNX_SPEC@GGUF_ROW`` in ``--variants``: ``ONNX_SPEC`` is what ``--precision`` takes
(``fp32,dit_step=int8_dynamic``), ``GGUF_ROW`` an LLM row of the study (``Q4_K_M``, ``F16``,
``Q4_K_M+emb-heads-Q8_0``). The ``@`` ends the ONNX spec, so its commas stay inside the item:
``--variants "e2e:fp32,dit_step=int8_dynamic@Q4_K_M,llm=Q8_0"`` is one mix and one GGUF row.

The reference is the golden pipeline (``export/reference/pipeline.GoldenPipeline``: the PyTorch reference
networks, fp32, one thread) driven by the same runtime ``Pipeline`` / ``Conversation`` code, so prompt, loop,
streaming detokenizer and noise are the runtime's own and only the networks differ. Its floors:

- ``fp32@F32``: the runtime at fp32 graphs and the F32 GGUF (every component's fp32 floor, end to end);
- ``noise_seed``: the golden pipeline with another detokenizer noise seed on the same tokens. Turns are greedy,
  so the sampler seed changes nothing but that noise; a speech difference below it is "within floor".

Every mix gets a real bundle in ``REPORT/cache/bundles/<mix>/`` (BundleWriter: manifest, sizes, sha256) of hard
links to the study's cached graphs and GGUFs, opened by ``Pipeline.from_bundle`` exactly as a device would.
Each cell runs in a child process (``python -m kimia_edge.quantization.study.end_to_end``; no torch in it) at the
deployment thread count, so its peak RSS is its own (cost.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from kimia_edge.quantization.study import metrics as M
from kimia_edge.runtime.metrics import peak_rss_mib
from kimia_edge.quantization.study.spec import E2E, FLOOR_E2E, LLM, Cell, StudyVariant

__all__ = ["DEFAULT_MIXES", "REPORT_NOTE", "SEED", "FLOOR_SEED", "extract_mixes", "parse_mix", "mix_graph_variants",
           "prepare", "e2e_cell", "run_turn", "compare_turns"]

log = logging.getLogger(__name__)

DEFAULT_MIXES = ("fp32@F16", "fp32,dit_step=int8_dynamic@Q4_K_M", "int8_dynamic@Q4_K_M")
SEED = 0        # the sampler seed of every turn (greedy: it only picks the detokenizer noise, turn_noise(seed))
FLOOR_SEED = 1  # the second seed of the between-seeds floor
NOISE_FLOOR = FLOOR_E2E[1]  # "noise_seed"; FLOOR_E2E[0] "fp32@F32" is a mix like the others
REPORT_NOTE = (
    "End to end: one greedy chat turn per clip of the runtime Pipeline over a bundle of the mix "
    "(`ONNX_SPEC@GGUF_ROW`) against the golden pipeline (the PyTorch reference networks, fp32, driven by the same "
    "runtime code) with the same sampler seed and detokenizer noise. WER of the answer's text, agreement of the audio "
    "tokens and of the text tokens per step, greedy steps until the first (audio, text) divergence, and the speech "
    "(zero-padded to the longer one): multi-resolution STFT distance, PESQ (wide band, at 16 kHz) and STOI. Floors: "
    "`fp32@F32` (the runtime at fp32 graphs and the F32 GGUF) and `noise_seed` (the golden pipeline's speech with "
    "another detokenizer noise seed on the same tokens: greedy turns differ between seeds only there).")
_ITEM = re.compile(r"(?:^|,)\s*e2e:([^@]*)@([^,\s]+)")


def extract_mixes(spec: Optional[str]) -> Tuple[str, List[str]]:
    """(``spec`` without its ``e2e:...@...`` items, the mixes as ``ONNX_SPEC@ROW``), each mix validated."""
    if not spec:
        return "", []
    mixes = [f"{onnx.strip()}@{row}" for onnx, row in _ITEM.findall(spec)]
    rest = _ITEM.sub("", spec)
    if "e2e:" in rest:
        raise ValueError(f"--variants {spec!r}: an end-to-end mix is written e2e:ONNX_SPEC@GGUF_ROW, "
                         "e.g. e2e:fp32,dit_step=int8_dynamic@Q4_K_M")
    for mix in mixes:
        parse_mix(mix)
    return rest.strip(" ,"), mixes


def parse_mix(mix: str) -> Tuple[str, str]:
    """``"fp32,dit_step=int8_dynamic@Q4_K_M"`` -> (ONNX precision spec, GGUF row); ValueError names what is wrong."""
    from kimia_edge.quantization.study.spec import _gguf_row, is_sensitivity_row
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS
    from kimia_edge.runtime.spec.precisions import parse_precision_spec

    onnx, sep, row = mix.partition("@")  # an ONNX spec holds no '@'; a sensitivity row does (Q4_K_M@trunk.blk.3)
    if not sep or not onnx or not row:
        raise ValueError(f"end-to-end mix {mix!r}: expected ONNX_SPEC@GGUF_ROW, e.g. fp32,dit_step=int8_dynamic@Q4_K_M")
    try:
        parse_precision_spec(onnx, RUNTIME_GRAPHS)
    except ValueError as e:
        raise ValueError(f"end-to-end mix {mix!r}: {e}") from None
    if row == "F32" or is_sensitivity_row(row):  # the F32 export; a sensitivity mix (its cells only)
        return onnx, row
    return onnx, _gguf_row(row)


def _graph_precisions(onnx: str) -> Dict[str, str]:
    """{runtime graph: precision} the mix asks for (the Pipeline falls back to fp32 where a graph does not allow it:
    both are in the mix's bundle)."""
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS
    from kimia_edge.runtime.spec.precisions import parse_precision_spec

    return parse_precision_spec(onnx, RUNTIME_GRAPHS)


def mix_graph_variants(mixes: Sequence[StudyVariant]) -> List[StudyVariant]:
    """The graph variants (fp32 of every runtime graph included) and GGUF rows the mixes' bundles need."""
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS

    need = {StudyVariant(g, "fp32") for g in RUNTIME_GRAPHS} | {StudyVariant(LLM, "F32_threads")}  # F32 GGUF
    for v in mixes:
        if v.name == NOISE_FLOOR:
            continue
        onnx, row = parse_mix(v.name)
        need |= {StudyVariant(g, p) for g, p in _graph_precisions(onnx).items()}
        if row != "F32":
            need.add(StudyVariant(LLM, row))
    return sorted(need)


def bundle_dir(paths, mix: str) -> Path:
    return paths.root / "cache" / "bundles" / re.sub(r"[^A-Za-z0-9_.+=@-]", "+", mix)


# ----------------------------------------------------------------------------------------------- preparation
def _profiles(paths, snapshot: Path) -> Dict[str, Any]:
    """{graph: (profiles, sidecar arrays)} of the runtime graphs, from the torch modules once (cached)."""
    import pickle

    from kimia_edge.runtime.fileio import atomic_write
    from kimia_edge.runtime.spec.graphs import RUNTIME_GRAPHS

    path = paths.graphs / "runtime_profiles.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    from kimia_edge.export.graphs import graph_spec

    out = {}
    for g in RUNTIME_GRAPHS:
        spec = graph_spec(g)
        module = spec.build(snapshot)
        out[g] = (spec.component, spec.profiles(module), spec.sidecar_arrays(module))
        del module
    atomic_write(path, lambda f: pickle.dump(out, f))
    return out


def _link(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def write_mix_bundle(paths, snapshot: Path, mix: str, out: Optional[Path] = None,
                     graphs: Optional[Dict[str, Path]] = None) -> Path:
    """REPORT/cache/bundles/<mix>/ (or ``out``): a real bundle (manifest with sizes and sha256) of the mix's graphs
    (and fp32, the runtime's fallback), its GGUF row, the VQ codebook and the text tokenizer. Made once.
    ``graphs``: {graph: ONNX file} standing for that graph's (non-fp32) precision of the mix (onnx_blocks.py: a
    one-block int8 graph as the graph's int8_dynamic)."""
    from kimia_edge.export.bundle import BundleWriter
    from kimia_edge.export.exporter import copy_text_tokenizer, model_config, source_info
    from kimia_edge.export.fileio import graph_files
    from kimia_edge.quantization.study.run import gguf_files
    from kimia_edge.runtime.spec.graphs import llm_artifact

    out = Path(out) if out is not None else bundle_dir(paths, mix)
    graphs = graphs or {}
    if out.exists():
        return out
    onnx, row = parse_mix(mix)
    info = _profiles(paths, snapshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    with BundleWriter(out, model=model_config(snapshot), source=source_info(snapshot)) as w:
        copy_text_tokenizer(w, snapshot)
        for g, precision in _graph_precisions(onnx).items():
            component, profiles, sidecars = info[g]
            for name, array in sidecars.items():
                np.save(w.path(f"{name}.npy"), array)
                w.add(name, component, "npy", str(array.dtype), [f"{name}.npy"])
            for p in sorted({"fp32", precision}):
                files = graph_files(graphs[g] if p != "fp32" and g in graphs else paths.graph(g, p))
                for f in files:
                    _link(f, w.path(f.name))
                w.add(g, component, "onnx", p, [f.name for f in files], profiles=profiles,
                      extra={"from": "quantization study cache"})
        for role, f in gguf_files(paths, row).items():
            _link(f, w.path(f"llm/{row}/{f.name}"))
            w.add(llm_artifact(role), "llm", "gguf", row, [f"llm/{row}/{f.name}"])
    log.info("bundle for %s written to %s", mix, out)
    return out


class _Recorder:
    """The LLM backend with every fed (audio, text) pair recorded (the greedy stream); no head flags."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.fed = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def reset(self) -> None:
        self.fed = []
        self._inner.reset()

    def prefill(self, audio_ids, text_ids, features, continuous_mask):
        return self._inner.prefill(audio_ids, text_ids, features, continuous_mask)

    def step(self, audio_id: int, text_id: int):
        self.fed.append((int(audio_id), int(text_id)))
        return self._inner.step(audio_id, text_id)


class _FlagRecorder(_Recorder):
    """As _Recorder, for backends that skip the heads a step does not need (llama.cpp): the same savings."""

    def prefill(self, audio_ids, text_ids, features, continuous_mask, *, need_text=True, need_audio=True):
        return self._inner.prefill(audio_ids, text_ids, features, continuous_mask, need_text=need_text,
                                   need_audio=need_audio)

    def step(self, audio_id: int, text_id: int, *, need_text=True, need_audio=True):
        self.fed.append((int(audio_id), int(text_id)))
        return self._inner.step(audio_id, text_id, need_text=need_text, need_audio=need_audio)


class _Timed:
    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start


def run_turn(components: Any, clip: np.ndarray, rate_hz: int, steps: int, seed: int = SEED) -> Dict[str, Any]:
    """One greedy chat turn of the runtime ``Pipeline`` over ``components`` (a bundle's or the golden pipeline's):
    text, fed (audio, text) pairs, audio tokens, speech [S] at the output rate, RunMetrics and the seconds spent in
    the DiT and the vocoder."""
    from kimia_edge.runtime.generation import GenerationConfig
    from kimia_edge.runtime.llm_backend import accepts_head_flags
    from kimia_edge.runtime.pipeline import Pipeline

    recorder = (_FlagRecorder if accepts_head_flags(components.backend) else _Recorder)(components.backend)
    components.backend = recorder
    tokens: List[int] = []
    timers: Dict[str, _Timed] = {}
    make = components.make_detokenizer

    def make_detokenizer(noise):
        det = make(noise)
        det.dit_step = timers.setdefault("dit", _Timed(det.dit_step))
        det.vocoder = timers.setdefault("vocoder", _Timed(det.vocoder))
        push = det.push

        def recorded_push(ids):
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            tokens.extend(int(i) for i in ids)
            return push(ids)

        det.push = recorded_push
        return det

    components.make_detokenizer = make_detokenizer
    config = GenerationConfig(output_type="both", step_limit=steps, seed=seed)  # greedy on both streams
    result = Pipeline(components).run(clip, rate_hz, "chat", config=config, seed=seed)
    return {"text": result.text, "fed": recorder.fed, "audio_tokens": tokens, "wav": result.wav,
            "sample_rate_hz": result.sample_rate_hz, "metrics": result.metrics,
            "seconds": {k: t.seconds for k, t in timers.items()}}


def prepare(paths, snapshot: Path, variants: Sequence[StudyVariant], clips16k: Dict[str, np.ndarray],
            steps: int, bundle: Optional[Path]) -> None:
    """For the e2e variants: the graph variants and GGUF rows their bundles need (no cells of their own), one
    bundle per mix, and per clip the golden turn (plus its speech with the second noise seed), cached."""
    from kimia_edge.quantization.study.run import (mark_unavailable, prepare_graph_references,
                                                   prepare_graph_variants, prepare_llm, _unavailable)
    from kimia_edge.runtime.spec.precisions import onnx_precision

    mixes = [v for v in variants if v.component == E2E]
    if not mixes:
        return
    need = mix_graph_variants(mixes)
    calibrated = sorted({v.component for v in need if v.component != LLM and onnx_precision(v.name).needs_calibration})
    prepare_graph_references(paths, snapshot, calibrated, clips16k)
    prepare_graph_variants(paths, snapshot, [v for v in need if v.component != LLM], clips16k, bundle)
    prepare_llm(paths, snapshot, [v for v in need if v.component == LLM], {}, steps)
    for v in mixes:
        if v.name == NOISE_FLOOR or _unavailable(paths, v):
            continue
        missing = [n.label for n in mix_graph_variants([v]) if _unavailable(paths, n)]
        if missing:
            mark_unavailable(paths, v, clips16k, f"needs {', '.join(missing)}, which could not be made")
            continue
        write_mix_bundle(paths, snapshot, v.name)
    _golden_references(paths, snapshot, clips16k, steps)


def _golden_references(paths, snapshot: Path, clips16k: Dict[str, np.ndarray], steps: int) -> None:
    todo = [c for c in clips16k if not paths.reference(c, E2E).exists()]
    if not todo:
        return
    import torch

    from kimia_edge.export.reference.pipeline import GoldenPipeline
    from kimia_edge.quantization.study.run import REFERENCE_TORCH_THREADS, _dump_pickle
    from kimia_edge.runtime.pipeline import turn_noise

    torch.set_num_threads(REFERENCE_TORCH_THREADS)
    golden = GoldenPipeline(snapshot)
    for clip in todo:
        start = time.perf_counter()
        with torch.inference_mode():
            ref = run_turn(golden.components(), clips16k[clip], 16000, steps)
            other = golden.synthesize(np.asarray(ref["audio_tokens"], np.int64), turn_noise(FLOOR_SEED))
        ref.update(metrics=None, wav_other_seed=other, seconds_total=time.perf_counter() - start,
                   clip_seconds=clips16k[clip].size / 16000)
        _dump_pickle(paths.reference(clip, E2E), ref)
        log.info("reference %s / e2e: %d steps, %d audio tokens, %.2f s of speech", clip, len(ref["fed"]),
                 len(ref["audio_tokens"]), ref["wav"].size / ref["sample_rate_hz"])


# ----------------------------------------------------------------------------------------------------- cells
def _padded(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both waveforms zero-padded to the longer one (missing speech counts as an error)."""
    n = max(a.size, b.size)
    return np.pad(a, (0, n - a.size)), np.pad(b, (0, n - b.size))


def compare_turns(ref: Dict[str, Any], got: Dict[str, Any]) -> Dict[str, Any]:
    """The end-to-end metrics of turn ``got`` against ``ref`` (both from :func:`run_turn`)."""
    rate = ref["sample_rate_hz"]
    a, b = _padded(np.asarray(ref["wav"], np.float64), np.asarray(got["wav"], np.float64))
    fed_ref, fed = [tuple(x) for x in ref["fed"]], [tuple(x) for x in got["fed"]]
    speech = a.size > 0 and np.any(a) and np.any(b)
    return {
        "wer": M.wer(ref["text"], got["text"]),
        "text": got["text"], "reference_text": ref["text"],
        "audio_token_agreement": M.token_agreement(ref["audio_tokens"], got["audio_tokens"]),
        "text_token_agreement": M.token_agreement([t for _, t in fed_ref], [t for _, t in fed]),
        "greedy_agreement_steps": M.agreement_length(fed_ref, fed),
        "greedy_steps": len(fed_ref),
        "audio_tokens": [len(ref["audio_tokens"]), len(got["audio_tokens"])],
        "speech_seconds": [a.size / rate, np.asarray(got["wav"]).size / rate],
        "speech_mrstft": M.multi_resolution_stft_distance(a, b) if a.size else None,
        "pesq": M.pesq_wb(a, b, rate) if speech else None,
        "stoi": M.stoi(a, b, rate) if speech else None,
    }


def _child_turn(bundle: Path, onnx: str, row: str, clip_path: Path, steps: int, threads: int,
                cache_dir: Path, out: Path) -> None:
    """The child process: opens the mix's bundle, runs the turn, writes out.npz (turn) + out.json (cost)."""
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono
    from kimia_edge.runtime.pipeline import PipelineOptions, components_from_bundle

    clip = to_16k_mono(*load_audio(clip_path))
    start = time.perf_counter()
    components = components_from_bundle(bundle, PipelineOptions(precision=onnx, llm_precision=row, threads=threads,
                                                                cache_dir=cache_dir))
    open_s = time.perf_counter() - start
    turn = run_turn(components, clip, 16000, steps)
    turn_s = time.perf_counter() - start - open_s
    m = turn.pop("metrics")
    np.savez(out.with_suffix(".npz"), wav=turn.pop("wav"), fed=np.asarray(turn.pop("fed"), np.int64).reshape(-1, 2),
             audio_tokens=np.asarray(turn.pop("audio_tokens"), np.int64))
    out.with_suffix(".json").write_text(json.dumps({
        **turn, "open_s": open_s, "turn_s": turn_s, "peak_rss_mib": peak_rss_mib(),
        "torch_loaded": "torch" in sys.modules,
        "run_metrics": {k: getattr(m, k) for k in ("input_audio_s", "encode_s", "prefill_s", "first_audio_s",
                                                   "llm_steps", "llm_steps_per_s", "output_audio_s", "encode_rtf",
                                                   "synth_rtf", "stop", "providers")}}))


def _run_child(paths, cell: Cell, clip_path: Path, steps: int, threads: int, mix: str, bundle: Path) -> Dict[str, Any]:
    onnx, row = parse_mix(mix)
    with tempfile.TemporaryDirectory(dir=paths.root / "cache") as tmp:
        out = Path(tmp) / "turn"
        cmd = [sys.executable, "-m", __name__, str(bundle), onnx, row, str(clip_path),
               str(steps), str(threads), str(paths.root / "cache" / "runtime"), str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"end-to-end cell {cell.key}: the child exited {done.returncode}:\n"
                               f"{done.stderr[-3000:]}")
        info = json.loads(out.with_suffix(".json").read_text())
        with np.load(out.with_suffix(".npz")) as z:
            info.update(wav=z["wav"], fed=[tuple(x) for x in z["fed"].tolist()],
                        audio_tokens=z["audio_tokens"].tolist())
    return info


def e2e_cell(paths, cell: Cell, mix: Optional[str] = None, bundle: Optional[Path] = None) -> Dict[str, Any]:
    """One end-to-end cell: metrics against the cached golden turn, and its cost (cost.py). ``mix`` / ``bundle``:
    the mix and the bundle to run when the cell's variant name is not the mix (onnx_blocks.py's one-block cells)."""
    from kimia_edge.quantization.study.cost import DEPLOYMENT_THREADS, turn_cost
    from kimia_edge.quantization.study.run import _load_pickle

    config = json.loads(paths.config.read_text())
    clip_path, steps = Path(config["clips"][cell.clip]), config["llm_steps"]
    ref = _load_pickle(paths.reference(cell.clip, E2E))
    if cell.variant.name == NOISE_FLOOR:  # same tokens and text, the other noise seed
        other = {**ref, "wav": ref["wav_other_seed"]}
        return {"metrics": compare_turns(ref, other),
                "cost": {"bytes": 0, "seconds": ref["seconds_total"], "torch_reference": True}}
    mix = mix or cell.variant.name
    bundle = bundle or bundle_dir(paths, mix)
    got = _run_child(paths, cell, clip_path, steps, DEPLOYMENT_THREADS, mix, bundle)
    return {"metrics": compare_turns(ref, got), "cost": turn_cost(got, bundle, *parse_mix(mix))}


if __name__ == "__main__":  # the child of one end-to-end cell (see _run_child)
    logging.basicConfig(level=logging.WARNING)
    b, o, r, c, s, t, cache, dst = sys.argv[1:9]
    _child_turn(Path(b), o, r, Path(c), int(s), int(t), Path(cache), Path(dst))
