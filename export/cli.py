"""Build-time sub-commands of ``kimia-edge`` (need the ``build`` extra: torch, onnx, gguf). Registering them
imports nothing heavy, so ``kimia-edge --help`` works on a runtime-only install; each handler first checks that the
build extra is installed and otherwise says so in one line (exit 2)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from kimia_edge.runtime.spec.graphs import ONNX_GRAPHS
from kimia_edge.runtime.spec.precisions import DEFAULT_EXPORT_PRECISIONS, DEFAULT_LLM_QUANTS, PRECISION_NAMES, onnx_precision

BUILD_MODULES = ("torch", "onnx", "onnxscript", "safetensors", "yaml")


def missing_build_modules() -> list:
    """The build extra's modules that cannot be imported here."""
    return [m for m in BUILD_MODULES if importlib.util.find_spec(m) is None]


def _needs_build_extra(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Runs a build-time handler: one line naming the extra when it is missing, and one line (exit 2) for the errors
    a user can act on — a file or folder that is missing, exists or is not what it should be (OSError), a bad snapshot,
    config or bundle (ValueError, BundleError and AudioFileError among them). With -v the traceback is shown."""
    def run(args: argparse.Namespace) -> int:
        missing = missing_build_modules()
        if missing:
            print(f"error: 'kimia-edge {args.command}' is build time and needs the build extra (missing: "
                  f"{', '.join(missing)}): pip install 'kimia-edge[build]'", file=sys.stderr)
            return 2
        try:
            return handler(args)
        except (OSError, ValueError) as e:
            if getattr(args, "verbose", 0):
                raise
            print(f"error: {e} (-v shows where it came from)", file=sys.stderr)
            return 2
    return run


def _snapshot_make(args: argparse.Namespace) -> int:
    from kimia_edge.export.snapshot.make import main_make

    return main_make(args.out, args.size, args.seed, args.components)


def _reference_run(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import soundfile as sf
    import torch
    from tqdm import tqdm

    from kimia_edge.export.reference.pipeline import GoldenPipeline
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono
    from kimia_edge.runtime.tasks import generation_config

    if args.threads:
        torch.set_num_threads(args.threads)
    samples, sr = load_audio(args.input)
    pipe = GoldenPipeline(args.snapshot, args.glm_tokenizer)
    config = generation_config(args.task, args.seed, step_limit=args.max_steps)
    start = time.perf_counter()
    with tqdm(desc=f"{args.task} steps", unit="step") as bar:
        result = pipe.run(args.task, to_16k_mono(samples, sr), seed=args.seed, config=config, on_step=lambda _: bar.update())
    print(f"text: {result.text!r}")
    print(f"{result.steps} steps ({result.stop}), {len(result.audio_tokens)} audio tokens, {time.perf_counter() - start:.1f} s")
    if args.output:
        if args.task != "chat":
            print(f"no speech to write: task {args.task!r} answers in text only (use --task chat)")
        elif result.wav.size == 0:
            print("no speech to write: the model emitted no audio tokens")
        else:
            sf.write(args.output, result.wav.astype(np.float32), result.sample_rate_hz, subtype="FLOAT")
            print(f"wrote {args.output}: {result.wav.size / result.sample_rate_hz:.2f} s at {result.sample_rate_hz} Hz")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kimia_edge.export.exporter import audio_files, export_bundle
    from kimia_edge.runtime.bundle import load_bundle

    precisions = args.precision
    speech = audio_files(args.calibration_audio or [])
    calibrated = [p for p in precisions if onnx_precision(p).needs_calibration]
    if calibrated and not speech:
        print(f"note: no --calibration-audio given, so no {', '.join(calibrated)} variants (calibrated on real speech)")
    out = export_bundle(args.snapshot, args.out, precisions=precisions, graphs=args.graphs, calibration_audio=speech,
                        llm_precision=None if args.no_llm else args.llm_precision, llm_quants=args.llm_quants,
                        overwrite=args.overwrite, seed=args.seed)
    manifest = load_bundle(out)  # verifies every hash it just wrote
    print(f"bundle {out}: {len(manifest.artifacts)} artifacts, {sum(a.bytes for a in manifest.artifacts) / 2**20:.1f} MiB")
    for a in manifest.artifacts:
        err = ", ".join(f"{k} {v:.2e}" for k, v in a.error.items())
        print(f"  {a.name:<16} {a.precision:<12} {a.bytes / 2**20:9.2f} MiB  {err}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from kimia_edge.quantization.study.report import replot, write_report
    from kimia_edge.quantization.study.run import run_study

    if args.replot:
        replot(args.replot)
        print(f"redrew {args.replot / 'report.md'} and its plots from report.json")
        return 0
    missing = [o for o in ("snapshot", "audio", "out") if getattr(args, o) is None]
    if missing:
        raise ValueError(f"study: {', '.join('--' + m for m in missing)} required (or --replot REPORT)")
    if args.budget:
        from kimia_edge.quantization.study.budget import parse_budget

        parse_budget(args.budget)  # a bad budget fails now, not after the study's cells
    if args.budget_keep:
        from kimia_edge.export.gguf_quantize import QUANT_TYPES

        if not args.budget or (args.budget_keep != "F32" and args.budget_keep not in QUANT_TYPES):
            raise ValueError(f"--budget-keep {args.budget_keep!r}: needs --budget and a llama.cpp type (e.g. Q8_0)")
    counts = run_study(args.snapshot, args.audio, args.out, variants=args.variants, jobs=args.jobs, steps=args.steps,
                       bundle=args.bundle, ray=args.ray, qdq_debug=args.qdq_debug)
    if args.budget or args.sensitivity:  # per-group sensitivity, then the budgeted mix (measured as a variant)
        from kimia_edge.quantization.study.budget import study_sensitivity

        rec = study_sensitivity(args.snapshot, args.audio, args.out, (args.sensitivity or "").split(","), args.budget,
                                variants=args.variants, jobs=args.jobs, steps=args.steps, bundle=args.bundle,
                                keep_type=args.budget_keep)
        if rec is not None:
            print(f"budget: {rec['status']} ({rec['why']})" + (f": --llm-quants '{rec['spec']}'" if rec["spec"] else ""))
    report = write_report(args.out)
    print(f"{counts['computed']} cells measured, {counts['reused']} reused from an earlier run")
    print(f"report: {args.out / 'report.md'} ({report['header']['label']})")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from kimia_edge.export.snapshot.make import COMPONENTS
    from kimia_edge.export.snapshot.presets import SIZES

    snap = sub.add_parser("snapshot", help="write random-weight snapshots in the official layout")
    snap_sub = snap.add_subparsers(dest="snapshot_command", metavar="ACTION")
    make = snap_sub.add_parser("make", help="write a tiny / small / full snapshot with random weights")
    make.add_argument("--size", choices=SIZES, default="tiny")
    make.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--components", nargs="+", choices=COMPONENTS, help="write only these (default: all)")
    make.set_defaults(handler=_needs_build_extra(_snapshot_make))

    exp = sub.add_parser("export", help="export a snapshot to a bundle: ONNX graphs, GGUF LLM, manifest")
    exp.add_argument("--snapshot", type=Path, required=True)
    exp.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    exp.add_argument("--precision", nargs="+", default=list(DEFAULT_EXPORT_PRECISIONS), choices=PRECISION_NAMES,
                     help=f"ONNX precision variants (fp32 always; default {' '.join(DEFAULT_EXPORT_PRECISIONS)})")
    exp.add_argument("--graphs", nargs="+", choices=ONNX_GRAPHS, help="only these graphs (default: all)")
    exp.add_argument("--calibration-audio", nargs="+", type=Path, help="speech files or folders for static int8")
    exp.add_argument("--llm-precision", choices=("f32", "f16"), default="f16", help="GGUF base precision")
    exp.add_argument("--llm-quants", nargs="*", default=list(DEFAULT_LLM_QUANTS),
                     help="llama.cpp quant types (e.g. Q8_0 Q4_K_M) or per-tensor-group mixes "
                          "(e.g. 'Q4_K_M+trunk.blk.0-3=Q8_0', docs/quantization.md)")
    exp.add_argument("--no-llm", action="store_true", help="skip the GGUF LLM")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--seed", type=int, default=0)
    exp.set_defaults(handler=_needs_build_extra(_export))

    study = sub.add_parser("study", help="measure what each precision costs, per component (quantization study)")
    study.add_argument("--snapshot", type=Path, help="snapshot folder (the reference)")
    study.add_argument("--audio", type=Path, help="folder of speech files (any rate, any channels)")
    study.add_argument("--out", type=Path, help="report folder; a re-run resumes what is stored there")
    study.add_argument("--variants", help="e.g. 'fp16,dit_step=int8_dynamic,llm=Q8_0,"
                                          "e2e:fp32,dit_step=int8_dynamic@Q4_K_M' "
                                          "(default: every precision the registry knows for every graph, every GGUF "
                                          "row, and three end-to-end mixes: docs/quantization.md)")
    study.add_argument("--jobs", type=int, default=1, help="cells measured in parallel (process pool; same numbers)")
    study.add_argument("--ray", metavar="ADDRESS", help="measure the cells on this Ray cluster (ray://host:10001, "
                                                        "auto) or on a Ray instance started for the run ('local', "
                                                        "--jobs CPUs); the workers must see --out")
    study.add_argument("--steps", type=int, default=64, help="greedy F32 steps of the LLM reference stream per clip")
    study.add_argument("--bundle", type=Path, help="take the fp32 graphs from this bundle of the same snapshot "
                                                   "instead of exporting them")
    study.add_argument("--sensitivity", metavar="ITEMS", help="per-block sensitivity, comma-separated: an ONNX graph "
                       "(e.g. dit_step: one block int8 at a time) or a llama.cpp type (e.g. Q4_K_M: one LLM layer, "
                       "embedding or head from the TYPE files, the rest F32; with --budget the first type, default "
                       "Q4_K_M)")
    study.add_argument("--budget", metavar="SPEC", help="recommend the smallest LLM mix within bounds on the LLM "
                       "or end-to-end metrics, e.g. 'e2e_audio_token_agreement>=0.99,text_top1>=0.99' (names: "
                       "quantization/study/budget.py), and measure it as an LLM row and end to end (e2e:fp32@SPEC)")
    study.add_argument("--budget-keep", metavar="TYPE", help="the budget greedy's second type: a group that breaks "
                       "the budget at the --sensitivity type is tried at TYPE (e.g. Q8_0, quantized for the study) "
                       "before it stays F32")
    study.add_argument("--qdq-debug", action="store_true", help="also the per-tensor activation error (SQNR) of "
                       "each static int8 (QDQ) variant, by ONNX Runtime's qdq_loss_debug, on one clip")
    study.add_argument("--replot", type=Path, metavar="REPORT", help="redraw report.md and the plots from "
                                                                    "REPORT/report.json, measure nothing")
    study.set_defaults(handler=_needs_build_extra(_study))

    ref = sub.add_parser("reference", help="run the PyTorch reference (the golden pipeline)")
    ref_sub = ref.add_subparsers(dest="reference_command", metavar="ACTION")
    run = ref_sub.add_parser("run", help="one turn on a wav file: asr / qa (text out) or chat (text + speech out)")
    run.add_argument("--snapshot", type=Path, required=True)
    run.add_argument("--glm-tokenizer", type=Path, help="GLM-4-Voice tokenizer folder (default: <snapshot>/glm-4-voice-tokenizer)")
    run.add_argument("--input", type=Path, required=True, help="speech file (any rate, any channels)")
    run.add_argument("--task", choices=("asr", "qa", "chat"), default="chat")
    run.add_argument("--output", type=Path, help="where to write the 24 kHz answer (chat)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-steps", type=int, help="cap on generation steps (not official; random weights rarely stop)")
    run.add_argument("--threads", type=int, help="torch threads")
    run.set_defaults(handler=_needs_build_extra(_reference_run))
