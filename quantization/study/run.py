"""``kimia-edge study``: runs the reference once per clip (cached), then every (variant, clip) cell, each stored as
it finishes; a re-run resumes. The report (report.py) is built from the stored cells.

Folder ``OUT``:

    study.json                      what was asked: snapshot and its fingerprint, clips, variants, steps
    cache/graphs/<graph>.<p>.onnx   the fp32 export (or the bundle's copy) and each precision variant, made once
    cache/gguf/<row>/               the F32 LLM export and each quantized row, made once
    cache/ref/<clip>/<component>.pkl  the torch / F32 reference on the clip's real inputs, computed once
    cells/<component>__<variant>__<clip>.json   one measured cell, written atomically when it finishes
    qdq_debug/<graph>__<variant>__<clip>.json   per-tensor error of a static int8 variant (--qdq-debug, qdq_debug.py)

Each ONNX variant maker runs in a child process (``run_child``): a maker that raises or is killed (OOM) marks its
variant not measured with the reason and the study goes on; a re-run tries it again.

Every cell runs on one thread (torch, ONNX Runtime, llama.cpp), so a run on a process pool (``--jobs``) gives the
same numbers as a serial one; timings under a pool share the cores and are marked so.

Graph cells measure the graph's outputs against the torch reference on the inputs the clip really produces at that
graph (the graph specs' ``calibration_feeds`` on this clip): Whisper features (cosine, SNR), VQ pre-codebook
activations and the semantic ids they pick (flip rate), adaptor embeddings, DiT step velocities plus the whole
streaming detokenizer run on the clip's semantic ids with the same noise (mel L1, log-spectral distance, SNR per
chunk), the vocoder on the reference stream's mel chunks (SNR, multi-resolution STFT distance). LLM cells measure
each GGUF row against the F32 export, teacher-forced on one fixed stream (llm_quality.py) per head, plus a free
greedy run (steps until the first divergence, audio / text token agreement).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from kimia_edge.quantization.study import metrics as M
from kimia_edge.quantization.study.spec import (E2E, LLM, Cell, StudyVariant, cell_list, clip_id, llm_rows,
                                                parse_variants, split)
from kimia_edge.runtime.fileio import atomic_write

__all__ = ["run_study", "StudyPaths", "load_cells", "REFERENCE_TORCH_THREADS", "FLOOR_THREADS"]

log = logging.getLogger(__name__)

REFERENCE_TORCH_THREADS = 1  # every reference and every cell on one thread: a pool gives the serial run's numbers
FLOOR_THREADS = 2            # the second thread count of the noise floor
NOISE_SEED = 1234            # the detokenizer's noise, the same for the reference and every variant
STUDY_VERSION = 1


class StudyPaths:
    def __init__(self, out: Path) -> None:
        self.root = Path(out)
        self.config = self.root / "study.json"
        self.graphs = self.root / "cache" / "graphs"
        self.gguf = self.root / "cache" / "gguf"
        self.ref = self.root / "cache" / "ref"
        self.cells = self.root / "cells"

    def graph(self, name: str, precision: str) -> Path:
        return self.graphs / f"{name}.{precision}.onnx"

    def reference(self, clip: str, component: str) -> Path:
        return self.ref / clip / f"{component}.pkl"

    def cell(self, cell: Cell) -> Path:
        return self.cells / f"{cell.key}.json"


def _dump_pickle(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


# -------------------------------------------------------------------------------------------------- preparation
def _graph_files_bytes(path: Path) -> int:
    from kimia_edge.export.fileio import graph_files

    return sum(p.stat().st_size for p in graph_files(path))


def _fp32_graph(paths: StudyPaths, snapshot: Path, name: str, bundle: Optional[Path]) -> Path:
    """cache/graphs/<name>.fp32.onnx: the bundle's fp32 graph if a bundle is given, else exported here."""
    import shutil

    from kimia_edge.export.fileio import external_data_file, graph_files

    dst = paths.graph(name, "fp32")
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    if bundle is not None:
        from kimia_edge.export.exporter import source_info
        from kimia_edge.runtime.bundle import read_manifest

        manifest = read_manifest(bundle)
        if manifest.source.get("config_sha256") != source_info(snapshot)["config_sha256"]:
            raise ValueError(f"--bundle {bundle} was not exported from {snapshot} (config fingerprints differ)")
        src = Path(bundle) / manifest.artifact(name, "fp32").path
        if src.name != dst.name:
            raise ValueError(f"{src}: expected a graph named {dst.name} (its data file is found by that name)")
        with _staged(dst) as tmp:
            for f in graph_files(src):
                shutil.copyfile(f, tmp if f == src else external_data_file(tmp))
        return dst
    from kimia_edge.export.graphs import graph_spec
    from kimia_edge.export.graphs.base import export_graph

    spec = graph_spec(name)
    with _staged(dst) as tmp:
        export_graph(spec, spec.build(snapshot), tmp)
    return dst


@contextlib.contextmanager
def _staged(dst: Path):
    """Yields a path with ``dst``'s file name in a staging folder beside it; on success moves the external-data file
    (its name is recorded inside the graph, so it keeps it) and then the graph into place. An interrupted write
    leaves no ``dst``, so a re-run makes it again."""
    import shutil

    from kimia_edge.export.fileio import external_data_file

    stage = dst.parent / f".staging-{dst.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage / dst.name
        if external_data_file(stage / dst.name).exists():
            os.replace(external_data_file(stage / dst.name), external_data_file(dst))
        os.replace(stage / dst.name, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _tile(features: np.ndarray, width: int) -> np.ndarray:
    reps = -(-width // features.shape[1])
    return np.ascontiguousarray(np.tile(features, (1, reps))[:, :width], dtype=np.float32)


def _graph_feeds(name: str, spec, module, context, pipe, clip16k: np.ndarray) -> List[Dict[str, np.ndarray]]:
    """The inputs ``clip16k`` really produces at graph ``name`` (the vocoder's: the reference stream's mel chunks)."""
    if name == "adaptor":
        width = module.cfg.kimia_adaptor_input_dim
        feats = pipe.encode_audio(clip16k).features
        return [{"features": feats if feats.shape[1] == width else _tile(feats, width)}]
    return spec.calibration_feeds(module, context)


def _reference_stream(pipe, ids: np.ndarray) -> List[Dict[str, np.ndarray]]:
    det = pipe.detokenizer(np.random.default_rng(NOISE_SEED))
    return [{"mel": c.mel, "vocoder_in_mel": c.vocoder_in_mel, "wav": c.wav}
            for c in [*det.push(ids), *det.finish()]]


def prepare_graph_references(paths: StudyPaths, snapshot: Path, graphs: Sequence[str],
                             clips: Dict[str, np.ndarray]) -> None:
    """cache/ref/<clip>/<graph>.pkl for every clip and graph not cached yet: feeds, torch outputs (1 thread)."""
    import torch

    from kimia_edge.export.graphs import graph_spec
    from kimia_edge.export.graphs.base import CalibrationContext, run_torch
    from kimia_edge.runtime.audio_tokenizer import kept_positions

    todo = [(c, g) for c in clips for g in graphs if not paths.reference(c, g).exists()]
    if not todo:
        return
    from kimia_edge.export.reference.pipeline import GoldenPipeline

    torch.set_num_threads(REFERENCE_TORCH_THREADS)
    pipe = GoldenPipeline(snapshot)
    modules = {}
    for clip, name in todo:
        spec = graph_spec(name)
        module = modules.setdefault(name, spec.build(snapshot).eval())
        context = CalibrationContext(snapshot, [clips[clip]], _pipeline=pipe)
        ref: Dict[str, Any] = {"clip_seconds": clips[clip].size / 16000}
        if name in ("dit_step", "vocoder"):
            ids = pipe.encode_audio(clips[clip]).semantic_ids
            stream = _reference_stream(pipe, ids)
            ref.update(ids=ids, stream=stream, dit=pipe.dit_config, streaming=pipe.streaming,
                       sample_rate_hz=pipe.sample_rate_hz)
        if name == "vocoder":
            feeds = [{"mel": np.ascontiguousarray(c["vocoder_in_mel"].T[None], np.float32)} for c in ref["stream"]]
        else:
            feeds = _graph_feeds(name, spec, module, context, pipe, clips[clip])
        inputs = [[torch.from_numpy(np.ascontiguousarray(f[n])) for n in spec.input_names] for f in feeds]
        ref["feeds"] = feeds
        ref["outputs"] = [run_torch(module, x) for x in inputs]
        if name == "vq_encoder":
            ref["codebook"] = module.encoder.codebook.weight.detach().float().numpy().copy()
            ref["kept"] = [kept_positions(f["frame_mask"][0], module.cfg) for f in feeds]
        _dump_pickle(paths.reference(clip, name), ref)
        log.info("reference %s / %s: %d inputs", clip, name, len(feeds))


class _MakerFailed(Exception):
    """A variant maker's child failed; the message says why."""


MAKER_MEMORY_ENV = "KIMIA_STUDY_MAKER_MEMORY_MIB"  # address-space limit (MiB) of each variant maker child; unset: none


def _limit_address_space(mib: Optional[int]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` putting RLIMIT_AS = ``mib`` MiB on the child (a real MemoryError / kill in a test)."""
    if not mib:
        return None

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))

    return limit


def run_child(target: str, args: Sequence[Any], *, tmpdir: Path, memory_mib: Optional[int] = None) -> Optional[str]:
    """Calls ``module:function(*args)`` (JSON-able args) in a fresh Python process, the pattern of
    export/gguf_quantize.py, and returns None if it succeeded, else why not (the signal that killed it, e.g. the
    OOM killer's SIGKILL, or the last line of its traceback). The child's TMPDIR is ``tmpdir`` (ORT's
    ``ort.quant.*`` folders land there, so the caller's cleanup removes them even from a killed child);
    ``memory_mib`` limits its address space."""
    import signal
    import subprocess
    import sys

    module, func = target.split(":")
    code = f"import json,sys;from {module} import {func} as f;f(*json.loads(sys.argv[1]))"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) if isinstance(a, Path) else a
                                                                   for a in args])],
                          capture_output=True, text=True, env=env, preexec_fn=_limit_address_space(memory_mib))
    if proc.returncode == 0:
        return None
    limit = f" under a {memory_mib} MiB address-space limit" if memory_mib else ""
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        oom = " (e.g. the OOM killer)" if name == "SIGKILL" else ""
        return f"maker process killed by {name}{oom}{limit}"
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", ln)),
                lines[-1] if lines else "no output")
    if len(last) > 400:  # ORT's messages put the cause (e.g. "Failed to allocate memory") after a long source path
        last = f"{last[:200]} … {last[-200:]}"
    return f"maker process exited {proc.returncode}{limit}: {last}"


def make_variant_child(precision: str, src: str, dst: str, references: List[str], signed_weights: bool) -> None:
    """The child's side of a variant maker: loads the calibration feeds from the reference pickles (none: no
    calibration) and writes the variant to ``dst`` (a staging path)."""
    from kimia_edge.quantization.variants import make_variant

    calibration = [f for r in references for f in _load_pickle(Path(r))["feeds"]] or None
    make_variant(precision, Path(src), Path(dst), calibration, signed_weights)


def prepare_graph_variants(paths: StudyPaths, snapshot: Path, variants: Sequence[StudyVariant],
                           clips: Dict[str, np.ndarray], bundle: Optional[Path],
                           memory_mib: Optional[int] = None, retry: bool = False) -> None:
    """The fp32 graph of every graph touched and each precision variant, made once. Static int8 is calibrated on the
    study's own clips (in-sample: the report says so).

    Each maker runs in a child process (run_child): one that raises, or is killed (OOM), marks its variant not
    measured with the reason, and the study goes on. ``retry``: a variant marked so by an earlier run is tried again
    (run_study's call: the machine may be quieter now, and a tool that refuses a graph refuses it again in seconds);
    without it (later calls of the same run) it stays marked. ``memory_mib`` (default:
    $KIMIA_STUDY_MAKER_MEMORY_MIB) limits each maker's address space."""
    from kimia_edge.runtime.spec.precisions import onnx_precision

    if memory_mib is None and os.environ.get(MAKER_MEMORY_ENV):
        memory_mib = int(os.environ[MAKER_MEMORY_ENV])
    graphs, _ = split(variants)
    for name in graphs:
        _fp32_graph(paths, snapshot, name, bundle)
    for v in variants:
        if v.component in (LLM, E2E) or v.floor or paths.graph(v.component, v.name).exists():
            continue
        if _unavailable(paths, v):
            if not retry:
                continue
            _forget_unavailable(paths, v)
        from kimia_edge.export.graphs import graph_spec

        spec = graph_spec(v.component)
        references = ([str(paths.reference(c, v.component)) for c in clips]
                      if onnx_precision(v.name).needs_calibration else [])
        dst = paths.graph(v.component, v.name)
        start = time.perf_counter()
        try:
            with _staged(dst) as tmp:  # a failed maker raises here: nothing half-made is moved into place
                why = run_child(f"{__name__}:make_variant_child",
                                [v.name, paths.graph(v.component, "fp32"), tmp, references,
                                 spec.int8_dynamic_signed_weights], tmpdir=tmp.parent / "tmp", memory_mib=memory_mib)
                if why is None and not tmp.exists():
                    why = "the maker exited 0 but wrote no graph"
                if why is not None:
                    raise _MakerFailed(why)
        except _MakerFailed as e:
            mark_unavailable(paths, v, clips, str(e))
            continue
        log.info("variant %s made in %.1f s", v.label, time.perf_counter() - start)


def _unavailable_path(paths: StudyPaths, v: StudyVariant) -> Path:
    return paths.root / "cache" / "unavailable" / f"{v.component}__{v.name}.txt"


def _unavailable(paths: StudyPaths, v: StudyVariant) -> bool:
    return _unavailable_path(paths, v).exists()


def _forget_unavailable(paths: StudyPaths, v: StudyVariant) -> None:
    """Removes an earlier run's "not measured" marker and cells of ``v`` (before trying to make it again)."""
    _unavailable_path(paths, v).unlink(missing_ok=True)
    for p in paths.cells.glob(f"{v.component}__{v.name}__*.json"):
        cell = json.loads(p.read_text())
        if "unavailable" in cell and (cell["component"], cell["variant"]) == (v.component, v.name):
            p.unlink()


def mark_unavailable(paths: StudyPaths, v: StudyVariant, clips, reason: str) -> None:
    """A variant that cannot be made: its cells are stored as unavailable with the reason (the report lists them)."""
    log.warning("%s: not measured (%s)", v.label, reason)
    path = _unavailable_path(paths, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n")
    for clip in clips:
        write_json(paths.cell(Cell(v, clip)), {"component": v.component, "variant": v.name, "floor": False,
                                                "clip": clip, "unavailable": reason, "version": STUDY_VERSION})


def gguf_files(paths: StudyPaths, row: str) -> Dict[str, Path]:
    from kimia_edge.export.gguf_export import GGUF_FILES

    folder = paths.gguf / row
    return {role: folder / f for role, f in GGUF_FILES.items() if (folder / f).exists()}


def prepare_llm(paths: StudyPaths, snapshot: Path, variants: Sequence[StudyVariant], clips: Dict[str, Path],
                steps: int) -> None:
    """The F32 GGUF export, each quantized row, and per clip the F32 reference: the fixed token stream (greedy F32
    steps after a chat prompt on the clip) and its teacher-forced logits."""
    from kimia_edge.export.gguf_export import export_llm_gguf
    from kimia_edge.export.gguf_quantize import quantize_llm
    from kimia_edge.quantization.llm_quality import golden_prompt, teacher_forced_logits, token_stream

    _, llm_variants = split(variants)
    if not llm_variants:
        return
    f32 = paths.gguf / "F32"
    if not (f32 / ".done").exists():
        export_llm_gguf(snapshot, f32, "f32")
        (f32 / ".done").touch()
    rows, _ = llm_rows()
    for v in llm_variants:
        if v.floor or (paths.gguf / v.name / ".done").exists() or _unavailable(paths, v):
            continue
        row = rows.get(v.name)
        qtype, out_t, emb_t = (row.qtype, row.output_type, row.token_embedding_type) if row else (v.name, None, None)
        try:
            quantize_llm(f32, paths.gguf / v.name, qtype, output_type=out_t, token_embedding_type=emb_t)
        except Exception as e:  # noqa: BLE001 - llama.cpp refusing a type on these shapes is a finding, not fatal
            why = re.sub(r"^.*?(llama_model_quantize failed \(exit -?\d+\)).*$", r"\1", str(e), flags=re.S)
            mark_unavailable(paths, v, clips, f"{type(e).__name__}: {qtype} (output {out_t}, embedding {emb_t}): {why}")
            continue
        (paths.gguf / v.name / ".done").touch()
    for clip, path in clips.items():
        target = paths.reference(clip, LLM)
        if target.exists():
            continue
        prompt, tokens, offset, note = golden_prompt(snapshot, path)
        n_ctx = len(prompt) + steps + 8
        with _llm_backend(gguf_files(paths, "F32"), n_ctx, REFERENCE_TORCH_THREADS) as be:
            stream = token_stream(be, prompt, tokens, offset, steps)
            logits = teacher_forced_logits(be, stream)
        _dump_pickle(target, {"stream": stream, "tokens": tokens, "offset": offset, "note": note, "n_ctx": n_ctx,
                              "logits": logits})
        write_json(target.with_name("llm_note.json"), {"note": note})
        log.info("reference %s / llm: %d prompt positions, %d steps", clip, len(prompt), len(stream.fed))


def _llm_backend(files: Dict[str, Path], n_ctx: int, threads: int):
    from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend

    return LlamaCppBackend(files["trunk"], files["audio"], files.get("adaptor"), n_ctx=n_ctx, n_threads=threads,
                           exact=True)


# -------------------------------------------------------------------------------------------------------- cells
def _compare_tensors(ref: np.ndarray, got: np.ndarray) -> Dict[str, float]:
    return {"cosine": M.cosine(ref, got), "snr_db": M.snr_db(ref, got), "rel_l2": M.rel_l2(ref, got)}


def _concat(outs: List[List[np.ndarray]], i: int) -> np.ndarray:
    return np.concatenate([np.asarray(o[i], dtype=np.float64).reshape(-1) for o in outs])


def _graph_runner(paths: StudyPaths, snapshot: Path, v: StudyVariant) -> Callable:
    """feed dict -> outputs, for the variant's graph on ONNX Runtime (1 thread) or, for the torch floor, the torch
    module on FLOOR_THREADS threads."""
    if v.name == "torch_threads":
        import torch

        from kimia_edge.export.graphs import graph_spec
        from kimia_edge.export.graphs.base import run_torch

        spec = graph_spec(v.component)
        module = spec.build(snapshot).eval()
        torch.set_num_threads(FLOOR_THREADS)
        return lambda feed: run_torch(module, [torch.from_numpy(np.ascontiguousarray(feed[n]))
                                              for n in spec.input_names])
    from kimia_edge.runtime.sessions import open_file_session

    session = open_file_session(paths.graph(v.component, v.name), threads=1)
    return lambda feed: session.run({n: feed[n] for n in session.input_names})


def _dit_stream(paths: StudyPaths, snapshot: Path, v: StudyVariant, ref: Dict[str, Any]) -> List[np.ndarray]:
    """The streaming detokenizer on the clip's ids with the variant's DiT step and the reference noise -> chunk mels
    (the vocoder is not run: a DiT cell measures the mel)."""
    from kimia_edge.runtime.detokenizer import StreamingDetokenizer

    cfg, streaming = ref["dit"], ref["streaming"]
    if v.name == "torch_threads":
        from kimia_edge.export.reference.dit import TorchDitStep
        from kimia_edge.export.reference.loaders import load_dit

        step = TorchDitStep(load_dit(snapshot))
    else:
        from kimia_edge.runtime.dit_onnx import OnnxDitStep
        from kimia_edge.runtime.sessions import open_file_session

        step = OnnxDitStep(open_file_session(paths.graph(v.component, v.name), threads=1), cfg.depth,
                           cfg.num_heads, cfg.head_dim)
    hop = streaming.frame_size_samples
    det = StreamingDetokenizer(step, lambda mel: np.zeros(mel.shape[0] * hop, np.float32), streaming, cfg,
                               noise=np.random.default_rng(NOISE_SEED))
    return [c.mel for c in [*det.push(ref["ids"]), *det.finish()]]


def graph_cell(paths: StudyPaths, snapshot: Path, cell: Cell) -> Dict[str, Any]:
    v = cell.variant
    ref = _load_pickle(paths.reference(cell.clip, v.component))
    run = _graph_runner(paths, snapshot, v)
    start = time.perf_counter()
    outs = [run(f) for f in ref["feeds"]]
    seconds = time.perf_counter() - start
    refs = ref["outputs"]
    m: Dict[str, Any] = {"inputs": len(outs)}
    if v.component == "whisper_encoder":
        m.update(_compare_tensors(_concat(refs, 0), _concat(outs, 0)))
        m["cosine"] = float(np.mean([M.cosine(r[0], o[0]) for r, o in zip(refs, outs)]))  # per Whisper frame
    elif v.component == "vq_encoder":
        from kimia_edge.runtime.audio_tokenizer import nearest_codebook_rows

        m.update(_compare_tensors(_concat(refs, 0), _concat(outs, 0)))
        cb = ref["codebook"]
        ids = [(nearest_codebook_rows(r[0][0][k], cb), nearest_codebook_rows(np.asarray(o[0][0], np.float32)[k], cb))
               for r, o, k in zip(refs, outs, ref["kept"])]
        m["flip_rate"] = M.flip_rate(np.concatenate([a for a, _ in ids]), np.concatenate([b for _, b in ids]))
        m["semantic_ids"] = int(sum(a.size for a, _ in ids))
    elif v.component == "dit_step":
        m.update({f"step_{k}": val for k, val in _compare_tensors(_concat(refs, 0), _concat(outs, 0)).items()})
        start = time.perf_counter()
        mels = _dit_stream(paths, snapshot, v, ref)
        seconds += time.perf_counter() - start
        ref_mels = [c["mel"] for c in ref["stream"]]
        chunks = [{"mel_l1": M.mel_l1(a, b), "lsd_db": M.log_spectral_distance_log(a, b), "snr_db": M.snr_db(a, b)}
                  for a, b in zip(ref_mels, mels)]
        m["chunks"] = chunks
        m["mel_l1"] = float(np.mean([c["mel_l1"] for c in chunks]))
        m["lsd_db"] = float(np.mean([c["lsd_db"] for c in chunks]))
        m["snr_db"] = M.snr_db(np.concatenate(ref_mels), np.concatenate(mels))
    elif v.component == "vocoder":
        a, b = _concat(refs, 0), _concat(outs, 0)
        m["snr_db"] = M.snr_db(a, b)
        m["mrstft"] = M.multi_resolution_stft_distance(a, b)
    else:  # adaptor and any graph without its own metrics: tensor agreement of every float output
        m.update(_compare_tensors(_concat(refs, 0), _concat(outs, 0)))
    path = paths.graph(v.component, "fp32" if v.name == "torch_threads" else v.name)
    return {"metrics": m, "cost": {"bytes": _graph_files_bytes(path), "seconds": seconds,
                                   "rtf": seconds / max(ref["clip_seconds"], 1e-9)}}


def llm_cell(paths: StudyPaths, cell: Cell) -> Dict[str, Any]:
    from kimia_edge.quantization.llm_quality import HEADS, teacher_forced_logits, token_stream

    v = cell.variant
    ref = _load_pickle(paths.reference(cell.clip, LLM))
    stream = ref["stream"]
    floor = v.name == "F32_threads"
    files = gguf_files(paths, "F32" if floor else v.name)
    threads = 2 if floor else REFERENCE_TORCH_THREADS
    start = time.perf_counter()
    with _llm_backend(files, ref["n_ctx"], threads) as be:
        logits = teacher_forced_logits(be, stream)
    with _llm_backend(files, ref["n_ctx"], threads) as be:
        free = token_stream(be, stream.prompt, ref["tokens"], ref["offset"], len(stream.fed))
    seconds = time.perf_counter() - start
    heads = {h: M.head_quality(ref["logits"][h], logits[h], seed=i) for i, h in enumerate(HEADS)}
    m = {
        "heads": heads,
        "greedy_agreement_steps": M.agreement_length(stream.fed, free.fed),
        "greedy_steps": len(stream.fed),
        "audio_token_agreement": M.token_agreement([a for a, _ in stream.fed], [a for a, _ in free.fed]),
        "text_token_agreement": M.token_agreement([t for _, t in stream.fed], [t for _, t in free.fed]),
    }
    from kimia_edge.quantization.llm_quality import _weights

    nbytes = sum(files[r].stat().st_size for r in ("trunk", "audio"))
    _, types = _weights(files)  # ggml type -> tensor count: shows the K-quants' fallbacks on small shapes
    return {"metrics": m, "cost": {"bytes": nbytes, "seconds": seconds, "threads": threads, "tensor_types": types}}


def compute_cell(out: str, snapshot: str, cell: Cell, pooled: bool) -> str:
    """Measures one cell and writes cells/<key>.json atomically; returns the key. Runs in a pool worker too."""
    import torch

    torch.set_num_threads(REFERENCE_TORCH_THREADS)
    paths = StudyPaths(Path(out))
    if cell.variant.component == E2E:
        from kimia_edge.quantization.study.end_to_end import e2e_cell

        result = e2e_cell(paths, cell)
    else:
        result = llm_cell(paths, cell) if cell.variant.component == LLM else graph_cell(paths, Path(snapshot), cell)
    result.update(component=cell.variant.component, variant=cell.variant.name, floor=cell.variant.floor,
                  clip=cell.clip, pooled=pooled, version=STUDY_VERSION)
    write_json(paths.cell(cell), result)
    return cell.key


# ---------------------------------------------------------------------------------------------------------- run
def _audio_files(folder: Path) -> List[Path]:
    from kimia_edge.export.exporter import audio_files

    files = audio_files([folder])
    if not files:
        raise ValueError(f"{folder}: no speech files (.wav, .flac, .ogg)")
    return files


def _study_config(snapshot: Path, clips: Dict[str, Path], variants: Sequence[StudyVariant], steps: int,
                  bundle: Optional[Path]) -> Dict[str, Any]:
    from kimia_edge.export.exporter import source_info
    from kimia_edge.export.snapshot.make import is_generated

    return {"version": STUDY_VERSION, "source": source_info(snapshot), "generated_snapshot": is_generated(snapshot),
            "clips": {c: str(p) for c, p in clips.items()}, "variants": [asdict(v) for v in variants],
            "llm_steps": steps, "bundle": str(bundle) if bundle else None}


def reference_notes(out: Path) -> List[str]:
    """What the references had to adapt (e.g. Whisper features tiled to the LLM adaptor's width), one per kind."""
    notes = set()
    for pkl in sorted(StudyPaths(out).ref.glob(f"*/{LLM}.pkl")):
        side = pkl.with_name("llm_note.json")
        note = json.loads(side.read_text())["note"] if side.exists() else _load_pickle(pkl).get("note")
        if note:
            notes.add(note)
    return sorted(notes)


def load_cells(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(StudyPaths(out).cells.glob("*.json"))]


def run_study(snapshot: Path, audio: Path, out: Path, *, variants: Optional[str] = None, jobs: int = 1,
              steps: int = 64, bundle: Optional[Path] = None, progress: bool = True,
              on_cell: Optional[Callable[[str], None]] = None, ray: Optional[str] = None,
              maker_memory_mib: Optional[int] = None, qdq_debug: bool = False) -> Dict[str, int]:
    """Prepares what is missing (graphs, GGUFs, references), then measures every cell not stored yet.
    ``on_cell(key)`` is called after each stored cell (tests interrupt a run with it). ``ray``: run the cells on
    that Ray cluster (or "local": ray_pool.py) instead of here. ``maker_memory_mib``: address-space limit of each
    ONNX variant maker's child process (default $KIMIA_STUDY_MAKER_MEMORY_MIB, else none). ``qdq_debug``: also the
    per-tensor error of each static int8 variant (qdq_debug.py). Returns counts."""
    from tqdm import tqdm

    from kimia_edge.runtime.frontend import load_audio, to_16k_mono

    snapshot, out = Path(snapshot), Path(out)
    paths = StudyPaths(out)
    chosen = parse_variants(variants)
    clip_paths = {clip_id(p): p for p in _audio_files(Path(audio))}
    config = _study_config(snapshot, clip_paths, chosen, steps, bundle)
    if paths.config.exists():
        old = json.loads(paths.config.read_text())
        if old["source"]["config_sha256"] != config["source"]["config_sha256"] or old.get("llm_steps") != steps:
            raise ValueError(f"{out} holds a study of another snapshot or step count; use a new --out")
        known = {(d["component"], d["name"]) for d in old["variants"]}
        config["variants"] = old["variants"] + [asdict(v) for v in chosen if (v.component, v.name) not in known]
        config["clips"] = {**old["clips"], **config["clips"]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(paths.config, config)

    clips16k = {c: to_16k_mono(*load_audio(p)) for c, p in clip_paths.items()}
    graphs, llm_variants = split(chosen)
    start = time.perf_counter()
    prepare_graph_references(paths, snapshot, graphs, clips16k)
    prepare_graph_variants(paths, snapshot, chosen, clips16k, bundle, maker_memory_mib, retry=True)
    prepare_llm(paths, snapshot, chosen, clip_paths, steps)
    from kimia_edge.quantization.study.end_to_end import prepare as prepare_end_to_end

    prepare_end_to_end(paths, snapshot, chosen, clips16k, steps, bundle)
    log.info("prepared in %.1f s", time.perf_counter() - start)

    cells = [c for c in cell_list(chosen, list(clip_paths)) if not paths.cell(c).exists()]
    total = len(cell_list(chosen, list(clip_paths)))
    done = 0
    bar = tqdm(total=len(cells), desc="study cells", unit="cell", disable=not progress)
    try:
        if ray:
            from kimia_edge.quantization.study.ray_pool import run_cells

            for key in run_cells(ray, str(out), str(snapshot), cells, jobs if jobs > 1 else 0):
                done += 1
                bar.update()
                if on_cell:
                    on_cell(key)
        elif jobs <= 1:
            for cell in cells:
                bar.set_postfix_str(cell.key, refresh=False)
                key = compute_cell(str(out), str(snapshot), cell, False)
                done += 1
                bar.update()
                if on_cell:
                    on_cell(key)
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(compute_cell, str(out), str(snapshot), c, True) for c in cells]
                try:
                    for fut in as_completed(futures):
                        key = fut.result()
                        done += 1
                        bar.update()
                        if on_cell:
                            on_cell(key)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    counts = {"cells": total, "computed": done, "reused": total - len(cells)}
    if qdq_debug:
        from kimia_edge.quantization.study.qdq_debug import prepare_qdq_debug

        counts["qdq_debug"] = prepare_qdq_debug(paths, chosen, list(clip_paths), maker_memory_mib)
    return counts


def default_jobs() -> int:
    return max(1, (os.cpu_count() or 1) // 2)
