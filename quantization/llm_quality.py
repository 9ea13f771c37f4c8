"""Quality of the quantized LLM GGUF variants vs the F32 export, per head (issue [C] item 4).

For each variant (llama.cpp's quantizer: F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, the lower K-quants Q4_K_S, Q3_K_M,
Q3_K_S, Q2_K and the IQ types llama.cpp makes without an importance matrix (IQ4_XS, IQ3_M), and Q4_K_M / Q3_K_M /
Q2_K with the embedding and both heads kept at Q8_0 (Q4_K_M also at F16)) and for each head (text = lm_head on the trunk, audio = mimo_output on the MIMO branch):

- mean and 99th-percentile KL divergence KL(P_f32 || P_variant) in nats, over the full vocabulary, per position;
- top-1 agreement: the fraction of positions where the variant's argmax equals the F32 argmax.

Positions: one fixed token stream, fed identically to every variant (teacher forcing): a "chat" prompt built from a
real speech clip through the golden pipeline's ``encode_audio`` (VQ ids + Whisper features), then ``steps`` greedy
steps of the F32 model through the generation loop (both streams, audio delay, forced blanks as the loop feeds
them). Every variant prefills the same prompt and is fed the same (audio, text) ids; the logits of the prompt's
last position and of every fed step are compared, so there are ``steps + 1`` positions per head.

All backends use the exact llama.cpp settings (flash attention off, F32 KV cache), so the only difference between
two rows is the weights; F32 against itself is exactly 0 (a check that the run is deterministic).

On a random-weight snapshot these numbers are a worst case for the quantizers (Gaussian weights have no outliers
to protect and no redundancy to exploit); they are not the accuracy of Kimi-Audio's real weights.

    python -m kimia_edge.quantization.llm_quality SNAPSHOT --clip CLIP.wav --work DIR [--steps 64] [--threads 2]
        [--out report]   (writes report.md and report.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import gguf
from kimia_edge.export.gguf_export import export_llm_gguf
from kimia_edge.export.gguf_quantize import quantize_llm
from kimia_edge.runtime.generation import GenerationConfig, generate_steps
from kimia_edge.runtime.llm_llamacpp import LlamaCppBackend
from kimia_edge.runtime.prompt import Prompt
from kimia_edge.runtime.sampler import SamplerParams
from kimia_edge.runtime.special_tokens import SpecialTokens
from kimia_edge.runtime.metrics import machine_label
from kimia_edge.quantization.study.metrics import kld_rows

__all__ = ["Variant", "VARIANTS", "HeadQuality", "VariantQuality", "TokenStream", "golden_prompt", "token_stream",
           "teacher_forced_logits", "kld_rows", "compare_heads", "run_study", "markdown_table", "main"]

log = logging.getLogger(__name__)

HEADS = ("text", "audio")
P99 = 99.0  # percentile reported besides the mean
MIN_STEPS = 64  # issue [C] item 4: at least 64 greedy steps after the prompt
GREEDY = SamplerParams(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=16)


@dataclass(frozen=True)
class Variant:
    """One row: llama.cpp ftype name (None = the F32 export itself) and optional per-tensor overrides of the
    output heads / token embedding (keys of gguf_quantize.TENSOR_TYPES)."""

    name: str
    qtype: Optional[str]
    output_type: Optional[str] = None
    token_embedding_type: Optional[str] = None


VARIANTS: Tuple[Variant, ...] = (
    Variant("F32", None),
    Variant("F16", "F16"),
    Variant("Q8_0", "Q8_0"),
    Variant("Q6_K", "Q6_K"),
    Variant("Q5_K_M", "Q5_K_M"),
    Variant("Q4_K_M", "Q4_K_M"),
    Variant("Q4_K_S", "Q4_K_S"),
    Variant("IQ4_XS", "IQ4_XS"),
    Variant("Q3_K_M", "Q3_K_M"),
    Variant("Q3_K_S", "Q3_K_S"),
    Variant("IQ3_M", "IQ3_M"),
    Variant("Q2_K", "Q2_K"),
    Variant("Q4_K_M, emb+heads Q8_0", "Q4_K_M", "Q8_0", "Q8_0"),
    Variant("Q4_K_M, emb+heads F16", "Q4_K_M", "F16", "F16"),
    Variant("Q3_K_M, emb+heads Q8_0", "Q3_K_M", "Q8_0", "Q8_0"),
    Variant("Q2_K, emb+heads Q8_0", "Q2_K", "Q8_0", "Q8_0"),
)


@dataclass(frozen=True)
class HeadQuality:
    """Per head: mean / p99 KLD (nats) and top-1 agreement over ``positions`` positions."""

    mean_kld: float
    p99_kld: float
    top1_agreement: float
    positions: int


@dataclass(frozen=True)
class VariantQuality:
    name: str
    weight_bytes: int  # tensor bytes of trunk + audio GGUF
    tensor_types: Dict[str, int]  # ggml type -> count of tensors (trunk + audio): shows K-quant fallbacks
    heads: Dict[str, HeadQuality] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenStream:
    """The fixed positions: ``prompt`` then the (audio_id, text_id) pairs fed back, in order."""

    prompt: Prompt
    fed: List[Tuple[int, int]]


# ------------------------------------------------------------------------------------------------- stream
def golden_prompt(snapshot: Path, clip: Path) -> Tuple[Prompt, SpecialTokens, int, Optional[str]]:
    """A "chat" prompt on the speech ``clip``, encoded by the golden pipeline (torch reference encoders).

    Returns (prompt, special tokens, token offset, note). If the snapshot's Whisper width (4 x d_model) differs from
    the LLM's ``kimia_adaptor_input_dim`` (the generated small snapshot has 4 x 256 = 1024 vs 5120), the features
    are tiled along their width to fit, and ``note`` says so (None otherwise)."""
    from kimia_edge.export.reference.pipeline import GoldenPipeline
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono
    from kimia_edge.runtime.prompt import AudioEncoding, build_prompt
    from kimia_edge.runtime.tasks import TASK_TABLE, task_messages

    pipe = GoldenPipeline(snapshot)
    samples, sr = load_audio(clip)
    samples = to_16k_mono(samples, sr)
    enc = pipe.encode_audio(samples)
    want = pipe.llm.config.kimia_adaptor_input_dim
    note = None
    have = enc.features.shape[1]
    if have != want:
        note = (f"snapshot mismatch: Whisper features are {have} wide, the LLM adaptor takes {want}; features tiled "
                f"to {want}")
        log.warning(note)
        reps = -(-want // have)
        enc = AudioEncoding(enc.semantic_ids, np.ascontiguousarray(np.tile(enc.features, (1, reps))[:, :want]))
    prompt = build_prompt(task_messages("chat", samples), TASK_TABLE["chat"].output_type, pipe.tokens,
                          pipe.token_offset, pipe.text_tokenizer.encode, lambda content: enc)
    return prompt, pipe.tokens, pipe.token_offset, note


def token_stream(backend: LlamaCppBackend, prompt: Prompt, tokens: SpecialTokens, token_offset: int,
                 steps: int) -> TokenStream:
    """Greedy "both"-mode generation loop on ``backend`` (the F32 model): the ids it feeds back, ``steps`` of them
    (fewer only if the audio stream stops)."""
    cfg = GenerationConfig(output_type="both", text=GREEDY, audio=GREEDY, step_limit=steps)
    fed = [(ev.audio_id, ev.text_id) for ev in generate_steps(backend, prompt, tokens, token_offset, cfg)]
    if len(fed) < steps:
        log.warning("the F32 loop stopped after %d of %d steps (audio stop id)", len(fed), steps)
    return TokenStream(prompt, fed)


def teacher_forced_logits(backend: LlamaCppBackend, stream: TokenStream) -> Dict[str, np.ndarray]:
    """{"text": [P, V], "audio": [P, V]} float32 logits at the prompt's last position and after each fed pair."""
    p = stream.prompt
    rows = {h: [] for h in HEADS}
    t, a = backend.prefill(p.audio_ids, p.text_ids, p.stacked_features(), p.continuous_mask)
    rows["text"].append(t), rows["audio"].append(a)
    for audio_id, text_id in stream.fed:
        t, a = backend.step(audio_id, text_id)
        rows["text"].append(t), rows["audio"].append(a)
    return {h: np.stack(r) for h, r in rows.items()}


# ------------------------------------------------------------------------------------------------ metrics
def compare_heads(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> Dict[str, HeadQuality]:
    out = {}
    for h in HEADS:
        k = kld_rows(ref[h], got[h])
        agree = np.argmax(ref[h], axis=-1) == np.argmax(got[h], axis=-1)
        out[h] = HeadQuality(float(k.mean()), float(np.percentile(k, P99)), float(agree.mean()), int(k.size))
    return out


def _weights(files: Dict[str, Path]) -> Tuple[int, Dict[str, int]]:
    total, types = 0, Counter()
    for role in ("trunk", "audio"):
        for t in gguf.GGUFReader(str(files[role])).tensors:
            total += int(t.n_bytes)
            types[t.tensor_type.name] += 1
    return total, dict(sorted(types.items()))


# ------------------------------------------------------------------------------------------------- study
def _open(files: Dict[str, Path], n_ctx: int, threads: int) -> LlamaCppBackend:
    return LlamaCppBackend(files["trunk"], files["audio"], files.get("adaptor"), n_ctx=n_ctx, n_threads=threads,
                           exact=True)


def run_study(snapshot: Path, work: Path, prompt: Prompt, tokens: SpecialTokens, token_offset: int, *,
              steps: int = MIN_STEPS, threads: int = 2, variants: Sequence[Variant] = VARIANTS,
              keep_files: bool = False) -> Dict[str, object]:
    """Exports F32 into ``work``/f32, quantizes each variant from it, measures; returns the JSON-able report."""
    work = Path(work)
    t0 = time.perf_counter()
    f32 = export_llm_gguf(snapshot, work / "f32", "f32").files()
    n_ctx = len(prompt) + steps + 8
    with _open(f32, n_ctx, threads) as be:
        stream = token_stream(be, prompt, tokens, token_offset, steps)
        ref = teacher_forced_logits(be, stream)
    rows: List[VariantQuality] = []
    for v in variants:
        if v.qtype is None:
            files = f32
        else:
            folder = work / v.name.replace(" ", "").replace(",", "_").replace("+", "-")
            files = quantize_llm(work / "f32", folder, v.qtype, output_type=v.output_type,
                                 token_embedding_type=v.token_embedding_type)
        with _open(files, n_ctx, threads) as be:
            got = teacher_forced_logits(be, stream)
        nbytes, types = _weights(files)
        rows.append(VariantQuality(v.name, nbytes, types, compare_heads(ref, got)))
        log.info("%s: %s", v.name, rows[-1].heads)
        if v.qtype is not None and not keep_files:
            for p in files.values():
                p.unlink(missing_ok=True)
    reader = gguf.GGUFReader(str(f32["trunk"]))
    hidden = int(reader.fields["qwen2.embedding_length"].contents())
    ffn = int(reader.fields["qwen2.feed_forward_length"].contents())
    return {
        "snapshot": str(snapshot), "hidden_size": hidden, "intermediate_size": ffn,
        "prompt_positions": len(prompt), "fed_steps": len(stream.fed), "positions_per_head": len(stream.fed) + 1,
        "threads": threads, "machine": machine_label(), "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - t0, 1),
        "variants": [asdict(r) for r in rows],
    }




def markdown_table(report: Dict[str, object]) -> str:
    """The report as a markdown table (one row per variant, both heads side by side)."""
    lines = [
        f"Snapshot `{Path(str(report['snapshot'])).name}` (hidden {report['hidden_size']}, FFN "
        f"{report['intermediate_size']}), {report['positions_per_head']} positions per head "
        f"({report['prompt_positions']}-position chat prompt from real speech, then {report['fed_steps']} greedy "
        f"F32 steps, teacher-forced); KLD = KL(F32 || variant) in nats; {report['machine']}, {report['date']}."
        + (f" Note: {report['prompt_note']}." if report.get("prompt_note") else ""),
        "",
        "| variant | weights (MB) | text mean KLD | text p99 KLD | text top-1 | audio mean KLD | audio p99 KLD "
        "| audio top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["variants"]:  # type: ignore[union-attr]
        t, a = r["heads"]["text"], r["heads"]["audio"]
        lines.append(f"| {r['name']} | {r['weight_bytes'] / 1e6:.1f} | {t['mean_kld']:.4g} | {t['p99_kld']:.4g} | "
                     f"{100 * t['top1_agreement']:.1f} % | {a['mean_kld']:.4g} | {a['p99_kld']:.4g} | "
                     f"{100 * a['top1_agreement']:.1f} % |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Per-head KLD / top-1 of the quantized LLM GGUFs vs F32")
    p.add_argument("snapshot", type=Path, help="snapshot folder (needs the LLM and both audio encoders)")
    p.add_argument("--clip", type=Path, required=True, help="speech clip for the prompt (any rate)")
    p.add_argument("--work", type=Path, required=True, help="folder for the GGUF files")
    p.add_argument("--steps", type=int, default=MIN_STEPS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of {[v.name for v in VARIANTS]}")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    p.add_argument("--keep-files", action="store_true", help="keep the quantized GGUFs")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = VARIANTS if a.variants is None else tuple(v for v in VARIANTS if v.name in set(a.variants))
    if a.variants is not None and len(chosen) != len(set(a.variants)):
        p.error(f"--variants: expected names among {[v.name for v in VARIANTS]}")
    prompt, tokens, offset, note = golden_prompt(a.snapshot, a.clip)
    report = run_study(a.snapshot, a.work, prompt, tokens, offset, steps=a.steps, threads=a.threads,
                       variants=chosen, keep_files=a.keep_files)
    report["prompt_note"] = note
    table = markdown_table(report)
    print(table)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".md").write_text(table + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
