"""GPU-ready check ([H] #14 item 7), the Python half of ``bench/gpu_check.sh``: runs every GPU path of a bundle,
compares each with the CPU fp32 result on the same inputs, refuses a silent CPU fallback and prints one table.
UNTESTED ON GPU: written and tested on a CPU-only machine, where ``--device cpu`` runs the same logic.

    python bench/gpu_check.py --bundle BUNDLE --device gpu [--precisions fp32 fp16] [--budget-s 480]
    python bench/gpu_check.py --bundle BUNDLE --device cpu --precisions fp32      # what the tests run

Reference: one spoken turn (a synthetic speech-like question) on the CPU with every graph at fp32 and the F32 GGUF
(F16 when the bundle has no F32); the first feeds and outputs of every graph are recorded there. Then, per path and
precision (rows of the table):

- ``ort-cuda`` / ``ort-tensorrt``: each runtime graph opened by the session factory on ONNX Runtime's CUDA /
  TensorRT EP (strict) and run on the recorded feeds: ms per call, max abs and rel L2 against the CPU fp32 outputs
  (the TensorRT EP's session lists TensorRT, CUDA, CPU: nodes TensorRT cannot take may run on CUDA, never a
  compute node on the CPU);
- ``trt-engine``: ``kimia-edge engines build``, then the same on our TensorRT engine runner;
- ``llama-gpu``: the LLM (trunk + audio branch) with every layer offloaded, on a fixed prompt and steps under the
  exact settings (flash attention off, F32 KV): ms per step, error of both heads' logits against the CPU;
- ``e2e-cuda`` / ``e2e-tensorrt``: a whole turn through ``Pipeline`` on that device with the LLM on the GPU: per
  stage RTF, LLM ms per step and first audio (no error: sampled tokens may diverge);
- ``ort-cpu``, ``llama-cpu``, ``e2e-cpu``: the same on the CPU (``--device cpu``).

A silent CPU fallback is a failure, never a pass: an ONNX Runtime session must list the asked provider first
(``get_providers()``, not ``get_available_providers()``, which lists CUDA on a machine without a GPU) and its
per-node profile must show no compute node (MatMul, Conv, attention...) on the CPU; our engine path must run on the
engine; llama.cpp must support GPU offload and its log must say that every layer was offloaded. Exit status: 0 if
every row passed, 1 otherwise (the FAIL rows name the path and why).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from kimia_edge.quantization.study.metrics import rel_l2
from kimia_edge.runtime.sessions import CPU_EP, CUDA_EP, TRT_ENGINE, TRT_EP, ProviderUnavailable, Session, open_session
from kimia_edge.runtime.spec.graphs import LLM_ADAPTOR, LLM_AUDIO, LLM_TRUNK, RUNTIME_GRAPHS
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS

GRAPH_PATHS = {"ort-cuda": CUDA_EP, "ort-tensorrt": TRT_EP, "trt-engine": TRT_ENGINE, "ort-cpu": CPU_EP}
LLM_PATHS = {"llama-gpu": True, "llama-cpu": False}  # path -> every layer on the GPU
E2E_PATHS = {"e2e-cuda": "cuda", "e2e-tensorrt": "tensorrt", "e2e-cpu": "cpu"}
DEVICE_PATHS = {
    "gpu": ("ort-cuda", "ort-tensorrt", "trt-engine", "llama-gpu", "e2e-cuda", "e2e-tensorrt"),
    "cpu": ("ort-cpu", "llama-cpu", "e2e-cpu"),
}
ALL_PATHS = tuple(GRAPH_PATHS) + tuple(LLM_PATHS) + tuple(E2E_PATHS)
ALL_LAYERS = 999  # n_gpu_layers: llama.cpp clamps it to the model's layer count (+ the output layer)
# fp32 on a GPU: cuBLAS / TensorRT may use TF32 for fp32 GEMMs (~1e-3 relative); fp16: the registry's bound
ONNX_TOLERANCE = {"fp32": 5e-3, "fp16": ONNX_PRECISIONS["fp16"].tolerance_rel_l2}
LLM_FOR_ONNX = {"fp32": ("F32", "F16"), "fp16": ("F16", "F32")}  # GGUF base precisions, preferred first
LLM_TOLERANCE = {"F32": 5e-3, "F16": 3e-2}
# ops whose placement on the CPU means the model's work ran there; shape / gather glue may stay on the CPU
COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention", "FusedMatMul",
               "FusedConv", "LayerNormalization", "SkipLayerNormalization", "Softmax", "FastGelu", "BiasGelu")
_OFFLOAD = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device ([^,\s]+)")


class CheckFailed(RuntimeError):
    """A path failed; the message names it and why."""


class SilentFallback(CheckFailed):
    """A path asked for a GPU and got the CPU (wholly or for its compute nodes)."""


@dataclass
class Row:
    """One line of the table. ``ms``: median per call (graphs) or per LLM step; ``rtf``: processing time / audio."""

    path: str
    precision: str
    stage: str
    provider: str = "-"
    ms: Optional[float] = None
    rtf: Optional[float] = None
    first_audio_s: Optional[float] = None
    max_abs: Optional[float] = None
    rel_l2: Optional[float] = None
    tolerance: Optional[float] = None
    status: str = "ok"
    detail: str = ""

    def fail(self, why: str) -> "Row":
        self.status, self.detail = "FAIL", why
        return self


# ------------------------------------------------------------------------------------------ fallback refusal
def profile_placement(profile_json: Path) -> Dict[str, Counter]:
    """{provider: Counter(op type)} of the nodes an ONNX Runtime profile (``enable_profiling``) says ran."""
    events = json.loads(Path(profile_json).read_text())
    placement: Dict[str, Counter] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
            placement.setdefault(args["provider"], Counter())[args.get("op_name", "?")] += 1
    return placement


def check_placement(path: str, session_providers: Sequence[str], placement: Mapping[str, Counter],
                    expected: str) -> str:
    """Refuses a silent CPU fallback of an ONNX Runtime session: the provider ORT really registered first must be
    ``expected`` and, for a GPU provider, no compute node may have run on the CPU. Returns a one-line summary."""
    if not session_providers or session_providers[0] != expected:
        raise SilentFallback(f"{path}: silent CPU fallback: asked for {expected}, ONNX Runtime runs on "
                             f"{list(session_providers)}")
    if not placement:
        raise CheckFailed(f"{path}: the ONNX Runtime profile lists no node (was the session run?)")
    if expected not in placement:
        raise SilentFallback(f"{path}: silent CPU fallback: no node ran on {expected} "
                             f"({', '.join(placement)} ran them all)")
    if expected != CPU_EP:
        on_cpu = {op: n for op, n in placement.get(CPU_EP, Counter()).items() if op in COMPUTE_OPS}
        if on_cpu:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(on_cpu.items()))
            raise SilentFallback(f"{path}: silent CPU fallback: compute nodes ran on {CPU_EP} ({ops})")
    total = sum(sum(c.values()) for c in placement.values())
    # the TensorRT EP's session also lists CUDA: the nodes TensorRT cannot take run there, and the summary says so
    others = ", ".join(f"{p} {sum(c.values())}" for p, c in placement.items() if p not in (expected, CPU_EP))
    return f"{expected} {sum(placement[expected].values())}/{total} nodes" + (f" ({others})" if others else "")


def offloaded_layers(log_text: str) -> List[Tuple[int, int]]:
    """(layers on a GPU, layers) for every model llama.cpp loaded, from its ``layer N assigned to device DEV`` log
    lines (every build prints them; a model starts again at layer 0), else from ``offloaded N/M layers to GPU``
    (printed only by builds with a GPU backend)."""
    models: List[List[str]] = []
    for index, device in _ASSIGNED.findall(log_text):
        if index == "0" or not models:
            models.append([])
        models[-1].append(device)
    if models:
        return [(sum(d != "CPU" for d in devices), len(devices)) for devices in models]
    return [(int(a), int(b)) for a, b in _OFFLOAD.findall(log_text)]


def check_offload(path: str, gpu_offload_supported: bool, counts: Sequence[Tuple[int, int]], models: int,
                  want_gpu: bool) -> str:
    """Refuses llama.cpp running on the CPU when every layer was asked on the GPU (or any layer on the GPU when
    none was asked). ``models``: how many models were loaded (trunk + audio branch). Returns a summary."""
    if want_gpu and not gpu_offload_supported:
        raise SilentFallback(f"{path}: silent CPU fallback: this llama.cpp has no GPU offload (n_gpu_layers is "
                             "ignored); rebuild llama-cpp-python with CMAKE_ARGS=\"-DGGML_CUDA=on\"")
    if len(counts) != models:
        raise CheckFailed(f"{path}: llama.cpp's log gave {len(counts)} offloaded-layer counts for {models} models")
    for done, total in counts:
        if want_gpu and done != total:
            raise SilentFallback(f"{path}: silent CPU fallback: llama.cpp offloaded {done}/{total} layers")
        if not want_gpu and done:
            raise CheckFailed(f"{path}: {done}/{total} layers offloaded to a GPU on the CPU path")
    return "llama.cpp " + ", ".join(f"{d}/{t}" for d, t in counts) + " layers on GPU"


# ------------------------------------------------------------------------------------------------ measuring
def parity(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(max abs, rel L2) of ``outs`` against ``refs``, over all outputs together."""
    if len(refs) != len(outs) or any(np.shape(r) != np.shape(o) for r, o in zip(refs, outs)):
        raise CheckFailed(f"outputs {[np.shape(o) for o in outs]}, expected {[np.shape(r) for r in refs]}")
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in refs])
    out = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs])
    return float(np.max(np.abs(out - ref), initial=0.0)), rel_l2(ref, out)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


@contextlib.contextmanager
def recording_feeds(store: Dict[str, Tuple[Dict[str, np.ndarray], List[np.ndarray]]]) -> Iterator[None]:
    """Keeps a copy of the first feeds and outputs of every session (by graph name) run while inside."""
    original = Session.run

    def run(self: Session, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        outs = original(self, feeds)
        if self.name not in store:
            store[self.name] = ({k: np.array(v, copy=True) for k, v in feeds.items()}, [np.array(o) for o in outs])
        return outs

    Session.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        Session.run = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------- paths
class Check:
    """One run of the check over a bundle: the CPU reference, then each path's rows."""

    def __init__(self, bundle: Path, work: Path, steps: int, repeats: int, deadline: float) -> None:
        from kimia_edge.runtime.bundle import read_manifest

        self.bundle, self.work, self.steps, self.repeats, self.deadline = bundle, work, steps, repeats, deadline
        self.manifest = read_manifest(bundle)
        self.llm_have = [a.precision for a in self.manifest.artifacts if a.name == LLM_TRUNK]
        self.graph_refs: Dict[str, Tuple[Dict[str, np.ndarray], List[np.ndarray]]] = {}
        self.llm_ref: List[np.ndarray] = []
        work.mkdir(parents=True, exist_ok=True)

    def llm_precision(self, onnx_precision: str) -> str:
        """The GGUF base precision paired with an ONNX precision (the other base one if the bundle lacks it)."""
        for p in LLM_FOR_ONNX[onnx_precision]:
            if p in self.llm_have:
                return p
        raise CheckFailed(f"the bundle has no F32 or F16 LLM (it has {self.llm_have}): export --llm-precision f32")

    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline

    # ---- the CPU fp32 reference ----------------------------------------------------------------------------
    def reference(self) -> List[Row]:
        """The CPU fp32 turn (feeds and outputs of every graph recorded) and the CPU LLM logits."""
        rows = self.turn_rows("reference", "cpu", "fp32", record=self.graph_refs)
        missing = [g for g in RUNTIME_GRAPHS if g not in self.graph_refs]
        if missing:
            rows.append(Row("reference", "fp32", ",".join(missing)).fail(
                f"the reference turn never ran {missing} (no speech in {self.steps} steps: raise --steps)"))
        try:
            self.llm_ref, _, _ = self.llm_logits(self.llm_precision("fp32"), want_gpu=False)
        except CheckFailed as e:
            rows.append(Row("reference", "fp32", "llm (trunk + audio)").fail(str(e)))
        return rows

    # ---- ONNX graphs ---------------------------------------------------------------------------------------
    def graph_rows(self, path: str, precision: str) -> List[Row]:
        expected = GRAPH_PATHS[path]
        cache = self.work / f"cache-{path}"  # one per path: the TensorRT EP must not find our engines
        rows = [Row(path, precision, g, expected, tolerance=ONNX_TOLERANCE[precision]) for g in RUNTIME_GRAPHS]
        if path == "trt-engine":
            try:
                self.build_engines(precision, cache)
            except CheckFailed as e:
                return [r.fail(str(e)) for r in rows]
        for row in rows:
            if self.over_budget():
                row.fail("not run: over the time budget (--budget-s)")
                continue
            try:
                self.graph_row(row, cache)
            except CheckFailed as e:
                row.fail(str(e))
        return rows

    def graph_row(self, row: Row, cache: Path) -> None:
        from kimia_edge.runtime.spec.manifest import BundleError

        graph, where = row.stage, f"{row.path} {row.stage} ({row.precision})"
        if graph not in self.graph_refs:
            raise CheckFailed(f"{where}: no reference feeds (the reference turn did not run it)")
        feeds, refs = self.graph_refs[graph]
        try:
            artifact = self.manifest.artifact(graph, row.precision)
        except BundleError as e:
            raise CheckFailed(f"{where}: {e} (export --precision fp32 fp16)") from None
        device = {CUDA_EP: "cuda", TRT_EP: "tensorrt", TRT_ENGINE: "tensorrt", CPU_EP: "cpu"}[row.provider]
        profile = None if row.provider == TRT_ENGINE else str(self.work / f"profile-{row.path}-{graph}-{row.precision}")
        try:
            session = open_session(self.bundle, artifact, device=device, cache_dir=cache, strict=True,
                                   profile_prefix=profile)
        except ProviderUnavailable as e:  # the factory refused what ORT would have done silently
            raise SilentFallback(f"{where}: silent CPU fallback refused: {e}") from None
        outs = session.run(feeds)  # warm-up: engines, kernels and the profile's one run
        if row.provider == TRT_ENGINE:
            if session.provider != TRT_ENGINE:
                raise SilentFallback(f"{where}: no engine ran: the session factory opened {session.provider}")
            row.provider = TRT_ENGINE
        else:
            placement = profile_placement(Path(session.impl.end_profiling()))
            row.provider = check_placement(where, session.impl.get_providers(), placement, row.provider)
        row.max_abs, row.rel_l2 = parity(refs, outs)
        row.ms = median_ms(lambda: session.run(feeds), self.repeats)
        if not row.rel_l2 <= row.tolerance:
            raise CheckFailed(f"{where}: rel L2 {row.rel_l2:.2e} above the tolerance {row.tolerance:.0e}")

    def build_engines(self, precision: str, cache: Path) -> None:
        """``kimia-edge engines build`` as a user runs it; CheckFailed with its last error line."""
        cmd = [sys.executable, "-m", "kimia_edge.cli", "engines", "build", "--bundle", str(self.bundle),
               "--precision", precision, "--cache-dir", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CheckFailed(f"trt-engine: kimia-edge engines build exited {done.returncode}: {last}")

    # ---- the LLM -------------------------------------------------------------------------------------------
    def llm_files(self, precision: str) -> Tuple[Path, Path, Optional[Path]]:
        adaptor = [a for a in self.manifest.artifacts if a.name == LLM_ADAPTOR]
        return (self.bundle / self.manifest.artifact(LLM_TRUNK, precision).path,
                self.bundle / self.manifest.artifact(LLM_AUDIO, precision).path,
                self.bundle / adaptor[0].path if adaptor else None)

    def llm_logits(self, precision: str, want_gpu: bool, path: str = "reference") -> Tuple[List[np.ndarray], float, str]:
        """Text and audio logits of a fixed prompt (32 positions) and 8 steps, ms per step, the offload summary."""
        import llama_cpp

        from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend, llama_log_capture

        with llama_log_capture() as log:
            backend = LlamaCppBackend(*self.llm_files(precision), n_gpu_layers=ALL_LAYERS if want_gpu else 0,
                                      exact=True, n_ctx=256)
        try:
            summary = check_offload(path, bool(llama_cpp.llama_supports_gpu_offload()), offloaded_layers("".join(log)),
                                    2, want_gpu)
            rng = np.random.default_rng(0)
            info = backend.info
            audio = rng.integers(info.token_offset, info.vocab_size, 40)
            text = rng.integers(1, info.token_offset, 40)
            logits = list(backend.prefill(audio[:32], text[:32], None, None))
            t0 = time.perf_counter()
            for a, t in zip(audio[32:], text[32:]):
                logits += backend.step(int(a), int(t))
            ms = 1e3 * (time.perf_counter() - t0) / 8
        finally:
            backend.close()
        return logits, ms, summary

    def llm_row(self, path: str, onnx_precision: str) -> Row:
        row = Row(path, onnx_precision, "llm (trunk + audio)")
        if self.over_budget():
            return row.fail("not run: over the time budget (--budget-s)")
        try:
            precision = self.llm_precision(onnx_precision)
            row.precision, row.tolerance = precision, LLM_TOLERANCE[precision]
            logits, row.ms, row.provider = self.llm_logits(precision, LLM_PATHS[path], path)
            row.max_abs, row.rel_l2 = parity(self.llm_ref, logits)
            if not row.rel_l2 <= row.tolerance:
                raise CheckFailed(f"{path}: logits rel L2 {row.rel_l2:.2e} above the tolerance {row.tolerance:.0e}")
        except CheckFailed as e:
            row.fail(str(e))
        return row

    # ---- whole turns ---------------------------------------------------------------------------------------
    def turn_rows(self, path: str, device: str, precision: str,
                  record: Optional[Dict[str, Tuple[Dict[str, np.ndarray], List[np.ndarray]]]] = None) -> List[Row]:
        """One spoken turn through ``Pipeline`` on ``device``: rows per stage (RTF, ms per LLM step, first audio)."""
        import llama_cpp

        from kimia_edge.demo import DEMO_RATE_HZ, speech_like_clip
        from kimia_edge.runtime.llm_llamacpp import llama_log_capture
        from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
        from kimia_edge.runtime.tasks import generation_config

        llm = self.llm_precision(precision)
        gpu = device != "cpu"
        cache = self.work / ("cache-trt-engine" if device == "tensorrt" else f"cache-{path}")
        options = PipelineOptions(precision=precision, llm_precision=llm, device=device, cache_dir=cache,
                                  n_gpu_layers=ALL_LAYERS if gpu else 0)
        label = f"{precision}/{llm}"
        try:
            with llama_log_capture() as log:
                pipe = Pipeline.from_bundle(self.bundle, options)
        except ProviderUnavailable as e:  # the factory refused what ORT would have done silently
            return [Row(path, label, "turn").fail(f"{path}: silent CPU fallback refused: {e}")]
        try:
            offload = check_offload(path, bool(llama_cpp.llama_supports_gpu_offload()),
                                    offloaded_layers("".join(log)), 2, gpu)
            wanted = {"cpu": (CPU_EP,), "cuda": (CUDA_EP,), "tensorrt": (TRT_ENGINE, TRT_EP)}[device]
            wrong = {g: p for g, p in pipe.c.providers.items() if g != "llm" and not p.startswith(wanted)}
            if wrong:
                raise SilentFallback(f"{path}: silent CPU fallback: the pipeline opened {wrong}")
            chat = pipe.conversation()
            config = generation_config("chat", seed=0, step_limit=self.steps)
            with recording_feeds(record) if record is not None else contextlib.nullcontext():
                for _ in chat.turn(speech_like_clip(), DEMO_RATE_HZ, "chat", config=config, seed=0):
                    pass
        except CheckFailed as e:
            return [Row(path, label, "turn").fail(str(e))]
        finally:
            pipe.c.backend.close()
        m = chat.last.metrics
        onnx = ", ".join(sorted({p.split(" (")[0] for g, p in pipe.c.providers.items() if g != "llm"}))
        return [
            Row(path, label, "audio tokenizer", onnx, ms=1e3 * m.encode_s, rtf=m.encode_rtf),
            Row(path, label, "LLM decode", offload, ms=1e3 / m.llm_steps_per_s if m.llm_steps_per_s else None,
                detail=f"{m.llm_steps} steps"),
            Row(path, label, "detokenizer+vocoder", onnx, rtf=m.synth_rtf, first_audio_s=m.first_audio_s,
                detail=f"{m.output_audio_s:.2f} s of speech"),
        ]

    def e2e_rows(self, path: str, precision: str) -> List[Row]:
        if self.over_budget():
            return [Row(path, precision, "turn").fail("not run: over the time budget (--budget-s)")]
        return self.turn_rows(path, E2E_PATHS[path], precision)


# --------------------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[Row]) -> str:
    """The one table: a header line, then one line per row (FAIL rows end with why)."""
    def f(v: Optional[float], fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = ["path", "precision", "stage", "provider", "ms", "RTF", "first audio s", "max abs", "rel L2", "tol",
            "status"]
    body = [[r.path, r.precision, r.stage, r.provider, f(r.ms, ".2f"), f(r.rtf, ".3f"), f(r.first_audio_s, ".2f"),
             f(r.max_abs, ".2e"), f(r.rel_l2, ".2e"), f(r.tolerance, ".0e"),
             r.status + (f": {r.detail}" if r.detail else "")] for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in [head] + body)


def run_check(bundle: Path, paths: Sequence[str], precisions: Sequence[str], work: Path, steps: int = 100,
              repeats: int = 5, budget_s: float = 480.0) -> List[Row]:
    """Every row of the check: the CPU reference first, then each path at each precision."""
    check = Check(bundle, work, steps, repeats, time.monotonic() + budget_s)
    rows = check.reference()
    if not check.llm_ref:
        return rows
    for path in paths:
        for precision in precisions:
            if path in GRAPH_PATHS:
                rows += check.graph_rows(path, precision)
            elif path in LLM_PATHS:
                rows.append(check.llm_row(path, precision))
            else:
                rows += check.e2e_rows(path, precision)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--device", choices=tuple(DEVICE_PATHS), default="gpu", help="which set of paths to run")
    parser.add_argument("--paths", nargs="+", choices=ALL_PATHS, help="these paths instead of the device's set")
    parser.add_argument("--precisions", nargs="+", choices=tuple(ONNX_TOLERANCE), default=["fp32", "fp16"])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/kimia-edge/gpu-check/check",
                        help="caches and ONNX Runtime profiles")
    parser.add_argument("--steps", type=int, default=100, help="LLM steps per spoken turn")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per graph (median)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="rows not started by then fail")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    from kimia_edge.runtime.metrics import machine_label

    start = time.monotonic()
    paths = args.paths or DEVICE_PATHS[args.device]
    if any(p not in DEVICE_PATHS["cpu"] for p in paths):  # CUDA / cuDNN from the nvidia-* wheels (onnxruntime-gpu
        import onnxruntime                                # >= 1.21); TensorRT's libraries: LD_LIBRARY_PATH

        getattr(onnxruntime, "preload_dlls", lambda: None)()
    rows = run_check(args.bundle, paths, args.precisions, args.work, args.steps, args.repeats, args.budget_s)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else "no NVIDIA GPU"
    print(f"\nGPU-ready check of {args.bundle} on {machine_label()}, {gpu}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {' '.join(load)}; "
          f"{time.monotonic() - start:.0f} s")
    print(format_table(rows))
    failed = [r for r in rows if r.status != "ok"]
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"\n{len(failed)} of {len(rows)} rows FAILED" if failed else f"\nall {len(rows)} rows passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
