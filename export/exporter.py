"""``kimia-edge export``: a snapshot in, a verified bundle out.

For every registered graph (export/graphs): export fp32 with torch's ONNX exporter (parity-checked against
the reference at several shapes), then each requested precision variant with ONNX Runtime's tools, its error
against the reference measured on held-out inputs (and on speech-derived inputs where the graph has them)
and stored in the manifest. The LLM goes in as GGUF files (trunk, audio branch, adaptor) with llama.cpp
quantized variants; the text tokenizer files are copied. Everything is written into a temporary folder and
renamed into place at the end (export/bundle.py).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from kimia_edge.export.bundle import BundleWriter, check_replaceable
from kimia_edge.export.graphs import REGISTRY, graph_spec
from kimia_edge.export.graphs.base import CalibrationContext, ErrorStats, GraphSpec, compare, export_graph, run_onnx, run_torch
from kimia_edge.export.fileio import graph_files
from kimia_edge.quantization.variants import make_variant
from kimia_edge.runtime.spec.graphs import TEXT_TOKENIZER, VAD, VAD_COMPONENT, VAD_DIR, llm_artifact
from kimia_edge.runtime.spec.manifest import MANIFEST_NAME, ModelConfig
from kimia_edge.runtime.spec.precisions import (DEFAULT_EXPORT_PRECISIONS, DEFAULT_LLM_QUANTS, PRECISION_NAMES,
                                                onnx_precision, precision_applies)

log = logging.getLogger(__name__)

DEFAULT_PRECISIONS = DEFAULT_EXPORT_PRECISIONS
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "config.json")
LLM_DIR = "llm"
_CALIBRATION_HOLDOUT = 4  # speech-derived feeds kept out of calibration to measure the int8 error


def model_config(snapshot: Path) -> ModelConfig:
    """The model config the runtime needs, read from the snapshot's own files."""
    from kimia_edge.export.snapshot.audio_encoders import find_glm_tokenizer, read_vq_encoder, read_whisper_encoder
    from kimia_edge.export.snapshot.detokenizer import read_detokenizer
    from kimia_edge.export.snapshot.llm import read_llm
    from kimia_edge.export.snapshot.vocoder import read_vocoder
    from kimia_edge.runtime.spec.streaming import StreamingConfig
    from kimia_edge.runtime.special_tokens import SpecialTokens

    llm, _ = read_llm(snapshot)
    return ModelConfig(
        llm=llm,
        special_tokens=SpecialTokens.from_snapshot(snapshot),
        whisper_encoder=read_whisper_encoder(snapshot)[0],
        vq_encoder=read_vq_encoder(find_glm_tokenizer(snapshot, None))[0],
        dit=read_detokenizer(snapshot)[0],
        streaming=StreamingConfig(),
        vocoder=read_vocoder(snapshot)[0],
    )


def source_info(snapshot: Path) -> Dict[str, Any]:
    """Where the bundle came from: the snapshot folder and a fingerprint of its config and index files."""
    h = hashlib.sha256()
    for name in sorted(["config.json", "model.safetensors.index.json", "audio_detokenizer/config.yaml", "vocoder/config.json",
                        "whisper-large-v3/config.json"]):
        p = Path(snapshot) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return {"snapshot": str(Path(snapshot).resolve()), "config_sha256": h.hexdigest()}


def _error_dict(prefix: str, err: ErrorStats) -> Dict[str, float]:
    return {f"{prefix}max_abs": err.max_abs, f"{prefix}rel_l2": err.rel_l2}


def _measure(spec: GraphSpec, path: Path, inputs: List[Sequence[torch.Tensor]], refs: List[List[np.ndarray]]
             ) -> ErrorStats:
    worst = ErrorStats(0.0, 0.0)
    for x, ref in zip(inputs, refs):
        worst = worst.worst(compare(spec, run_onnx(path, spec, x), ref))
    return worst


def _feeds_to_inputs(spec: GraphSpec, feeds: List[Dict[str, np.ndarray]]) -> List[List[torch.Tensor]]:
    return [[torch.from_numpy(np.ascontiguousarray(f[n])) for n in spec.input_names] for f in feeds]


def export_graphs(writer: BundleWriter, snapshot: Path, names: Sequence[str], precisions: Sequence[str],
                  context: CalibrationContext, seed: int = 0) -> None:
    for name in tqdm(names, desc="graphs", unit="graph"):
        spec = graph_spec(name)
        module = spec.build(snapshot)
        rel = f"{name}.fp32.onnx"
        start = time.perf_counter()
        result = export_graph(spec, module, writer.path(rel), seed=seed)
        profiles = spec.profiles(module)
        log.info("%s fp32: exported in %.1f s, error %s", name, time.perf_counter() - start, result.fp32_error)
        for array_name, array in spec.sidecar_arrays(module).items():
            np.save(writer.path(f"{array_name}.npy"), array)
            writer.add(array_name, spec.component, "npy", str(array.dtype), [f"{array_name}.npy"])

        held_out = [spec.example_inputs(module, n, seed + 1000 + i) for i, n in enumerate(spec.parity_lengths)]
        held_refs = [run_torch(module, x) for x in held_out]
        speech_feeds: List[Dict[str, np.ndarray]] = []
        if any(onnx_precision(p).needs_calibration for p in precisions) and context.speech_16k:
            speech_feeds = spec.calibration_feeds(module, context)
        calibration, speech_eval = speech_feeds[:-_CALIBRATION_HOLDOUT] or speech_feeds, speech_feeds[-_CALIBRATION_HOLDOUT:]
        speech_inputs = _feeds_to_inputs(spec, speech_eval)
        speech_refs = [run_torch(module, x) for x in speech_inputs]
        del module  # the references are computed: free the weights before quantizing (a 6 GB graph needs ~15 GB)
        gc.collect()

        rejected: Dict[str, Dict[str, float]] = {}
        for precision in precisions:
            if precision == "fp32":
                continue
            if not precision_applies(precision, name):
                log.info("%s: no %s variant (the registry makes it of %s only)", name, precision,
                         onnx_precision(precision).graphs)
                continue
            if onnx_precision(precision).needs_calibration and not calibration:
                log.warning("%s: no %s variant (%s)", name, precision,
                            "no calibration speech given" if not context.speech_16k else "this graph defines no calibration inputs")
                continue
            vpath = writer.path(f"{name}.{precision}.onnx")
            make_variant(precision, writer.path(rel), vpath, calibration, spec.int8_dynamic_signed_weights)
            worst = _measure(spec, vpath, held_out, held_refs)
            error = _error_dict("", worst)
            if speech_inputs:
                speech = _measure(spec, vpath, speech_inputs, speech_refs)
                error.update(_error_dict("speech_", speech))
                worst = worst.worst(speech)
            if worst.rel_l2 > spec.variant_rel_l2[precision]:
                log.warning("%s %s: not listed, rel L2 error %.3g exceeds its tolerance %.3g", name, precision,
                            worst.rel_l2, spec.variant_rel_l2[precision])
                rejected[precision] = {**error, "tolerance_rel_l2": spec.variant_rel_l2[precision]}
                for f in graph_files(vpath):
                    f.unlink()
                continue
            files = [str(f.relative_to(writer.root)) for f in graph_files(vpath)]
            writer.add(name, spec.component, "onnx", precision, files,
                       error={**error, "tolerance_rel_l2": spec.variant_rel_l2[precision]}, profiles=profiles)
            log.info("%s %s: error %s", name, precision, error)
        extra = {"export_seconds": round(result.seconds, 2), **({"rejected_variants": rejected} if rejected else {})}
        writer.add(name, spec.component, "onnx", "fp32", [str(f.relative_to(writer.root)) for f in result.files],
                   error=_error_dict("", result.fp32_error), profiles=profiles, extra=extra)


def export_llm(writer: BundleWriter, snapshot: Path, base_precision: str, quants: Sequence[str]) -> None:
    """The LLM as GGUF: trunk, audio branch and adaptor at ``base_precision`` (f32 | f16), then llama.cpp quants
    of the trunk and the audio branch. The adaptor (small, F32) is stored once and shared by every variant."""
    from kimia_edge.export.gguf_export import export_llm_gguf, gguf_component_bytes
    from kimia_edge.export.gguf_quantize import quantize_llm

    base_dir = writer.path(f"{LLM_DIR}/{base_precision}")
    variants = [(base_precision.upper(), export_llm_gguf(snapshot, base_dir, precision=base_precision).files())]
    for q in tqdm(quants, desc="llama.cpp quants", unit="quant"):
        files = dict(quantize_llm(base_dir, writer.path(f"{LLM_DIR}/{q}"), q))
        copy = files.pop("adaptor", None)
        if copy is not None:
            Path(copy).unlink()  # identical to the base adaptor
        variants.append((q, files))
    for precision, files in variants:
        sizes = gguf_component_bytes(files)
        for role, path in files.items():
            rel = str(Path(path).relative_to(writer.root))
            writer.add(llm_artifact(role), "llm", "gguf", precision, [rel],
                       extra={"tensor_bytes": sizes[role]["tensor_bytes"], "tensors": sizes[role]["tensors"]})


def copy_text_tokenizer(writer: BundleWriter, snapshot: Path) -> None:
    files = []
    for name in TOKENIZER_FILES:
        src = Path(snapshot) / name
        if src.is_file():
            shutil.copyfile(src, writer.path(f"{TOKENIZER_DIR}/{name}"))
            files.append(f"{TOKENIZER_DIR}/{name}")
    if not any(f.endswith("tiktoken.model") for f in files):
        raise FileNotFoundError(f"{snapshot}: tiktoken.model not found (the text tokenizer is part of the snapshot)")
    writer.add(TEXT_TOKENIZER, "tokenizer", "tiktoken", "n/a", files)


VAD_PACKAGE = "silero-vad"
VAD_MODEL = "silero_vad/data/silero_vad.onnx"  # the graph silero-vad's own load_silero_vad(onnx=True) opens


def installed_vad() -> Optional[Tuple[Path, Path, str]]:
    """(ONNX graph, licence file, version) of the installed silero-vad package, located through its metadata and
    never imported (its __init__ imports torch and sets torch's thread count); None if it is not installed or lacks
    either file (logged as a warning: the bundle then gets no VAD and the runtime uses energy VAD)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(VAD_PACKAGE)
    except metadata.PackageNotFoundError:
        log.warning("%s is not installed: the bundle gets no VAD (the runtime falls back to energy VAD); "
                    "pip install %s", VAD_PACKAGE, VAD_PACKAGE)
        return None
    model = Path(str(dist.locate_file(VAD_MODEL)))
    licence = next((f for f in dist.files or () if Path(str(f)).name in ("LICENSE", "LICENSE.txt")), None)
    if not model.is_file() or licence is None:
        log.warning("%s %s: %s or its LICENSE not found in the installed package: the bundle gets no VAD",
                    VAD_PACKAGE, dist.version, VAD_MODEL)
        return None
    return model, Path(str(dist.locate_file(licence))), dist.version


def copy_vad(writer: BundleWriter) -> bool:
    """Copies Silero VAD's ONNX graph and its MIT licence from the installed silero-vad package into ``vad/`` and
    lists them as the ``vad`` artifact (fp32, ``extra`` names the package version). Without the package: a warning,
    no artifact. Returns whether the artifact was added."""
    found = installed_vad()
    if found is None:
        return False
    model, licence, version = found
    shutil.copyfile(model, writer.path(f"{VAD_DIR}/{model.name}"))
    shutil.copyfile(licence, writer.path(f"{VAD_DIR}/LICENSE"))
    writer.add(VAD, VAD_COMPONENT, "onnx", "fp32", [f"{VAD_DIR}/{model.name}", f"{VAD_DIR}/LICENSE"],
               extra={"package": f"{VAD_PACKAGE}=={version}", "licence": "MIT", "sample_rate_hz": 16_000,
                      "window_samples": 512})
    log.info("VAD: %s %s copied into the bundle", VAD_PACKAGE, version)
    return True


def export_bundle(snapshot: Path, out: Path, precisions: Sequence[str] = DEFAULT_PRECISIONS,
                  graphs: Optional[Sequence[str]] = None, calibration_audio: Sequence[Path] = (),
                  llm_precision: Optional[str] = "f16", llm_quants: Sequence[str] = DEFAULT_LLM_QUANTS,
                  overwrite: bool = False, seed: int = 0) -> Path:
    """Exports ``snapshot`` into the bundle folder ``out``; returns ``out``. ``llm_precision=None`` skips the LLM."""
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono

    bad = sorted(set(precisions) - set(PRECISION_NAMES))
    if bad or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and come from {PRECISION_NAMES}, got {list(precisions)}")
    if Path(out).exists():  # before any work, not after minutes of export
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        check_replaceable(Path(out))
    if llm_precision:  # a bad quant type or mix spec fails now, not after the graphs
        from kimia_edge.export.gguf_quantize import check_quant_spec

        for q in llm_quants:
            check_quant_spec(q)
    names = list(graphs) if graphs else list(REGISTRY)
    speech = [to_16k_mono(*load_audio(p)) for p in calibration_audio]
    context = CalibrationContext(Path(snapshot), speech)
    start = time.perf_counter()
    with BundleWriter(out, model=model_config(snapshot), source=source_info(snapshot), overwrite=overwrite) as w:
        copy_text_tokenizer(w, snapshot)
        copy_vad(w)
        export_graphs(w, snapshot, names, precisions, context, seed)
        if llm_precision:
            export_llm(w, snapshot, llm_precision, llm_quants)
    log.info("bundle %s written in %.1f s", out, time.perf_counter() - start)
    return Path(out)


def audio_files(paths: Sequence[Path]) -> List[Path]:
    """Expands folders into the audio files they hold (wav, flac, ogg), sorted."""
    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in (".wav", ".flac", ".ogg"))
        else:
            found.append(p)
    return found


__all__ = ["export_bundle", "copy_vad", "installed_vad", "model_config", "source_info", "DEFAULT_PRECISIONS", "MANIFEST_NAME"]
