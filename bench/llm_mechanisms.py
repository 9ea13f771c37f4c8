"""How to get the layer-`fork` hidden state out of llama.cpp for the MIMO (audio) branch: per-step cost of the
candidate mechanisms, side by side, on one machine and one GGUF export.

- raw trunk:        the full trunk GGUF, no callback, text head on (the floor: a plain Qwen2 decode step).
- raw trunk, no head: same with logits=0 (does llama.cpp skip the head when no output is requested?).
- idle callback:    the trunk with a cb_eval that asks for nothing (pure cost of the Python callback per node).
- A:                trunk + cb_eval capturing ``l_out-{fork}`` + the MIMO GGUF decode (the shipped mechanism).
- A, text ended:    A with the trunk's head skipped (logits=0 for the trunk token).
- B:                trunk split in two GGUFs, part 1 = layers 0..fork (head of 1 row, so all rows survive the last-layer
                    pruning), captured with cb_eval on its last layer; part 2 = layers fork+1.. + norm + lm_head (stored as
                    the tied token_embd); + the MIMO GGUF. A qwen2 GGUF's only output is after output_norm, so part 1
                    still needs the callback: B cannot avoid cb_eval.
- B, text ended:    part 1 + MIMO only (the text tail is not run at all).

The A-vs-B logit check is exact with F32 files (~2e-6); with F16/quantized files it differs by the batched vs
row-by-row prompt kernels (B's prototype decodes its prompt one row at a time), not by the mechanism.

Every step feeds one position (embeddings), after a prompt of --prompt positions; the median over --steps is shown.

    python bench/llm_mechanisms.py [--size tiny|small] [--precision f32|f16] [--quant Q8_0] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

import gguf
import llama_cpp as llama
from kimia_edge.runtime.llm_llamacpp import (HiddenCapture, LlamaCppBackend, LlamaModel, _init_backend,
                                             read_model_info)
from kimia_edge.runtime.metrics import machine_label




# ------------------------------------------------------------------------------------------------ B files
def _copy_kv(src: gguf.GGUFReader, w: gguf.GGUFWriter, overrides: Dict[str, int]) -> None:
    adders = {gguf.GGUFValueType.STRING: w.add_string, gguf.GGUFValueType.UINT32: w.add_uint32,
              gguf.GGUFValueType.FLOAT32: w.add_float32, gguf.GGUFValueType.BOOL: w.add_bool}
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name in overrides:
            w.add_uint32(f.name, overrides[f.name])
        elif f.types and f.types[0] in adders:
            adders[f.types[0]](f.name, f.contents())


def _write(path: Path, src: gguf.GGUFReader, overrides: Dict[str, int], tensors: List[tuple]) -> None:
    w = gguf.GGUFWriter(path, "qwen2")
    _copy_kv(src, w, overrides)
    for name, t in tensors:
        if isinstance(t, np.ndarray):
            w.add_tensor(name, t)
        else:
            raw = np.asarray(t.data)
            w.add_tensor(name, raw, raw_shape=raw.shape if raw.dtype != np.uint8 else None,
                         raw_dtype=None if raw.dtype in (np.float32, np.float16) else t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def split_trunk(trunk: Path, out_dir: Path) -> tuple:
    """Writes mechanism B's two files from a trunk GGUF (prototype only; not part of the export)."""
    src = gguf.GGUFReader(str(trunk))
    info = read_model_info(src, str(trunk))
    by = {t.name: t for t in src.tensors}
    fork, n = info.fork_layer, info.main_layers

    def blocks(lo: int, hi: int) -> List[tuple]:
        out = []
        for i in range(lo, hi):
            for name, t in by.items():
                if name.startswith(f"blk.{i}."):
                    out.append((f"blk.{i - lo}." + name.split(".", 2)[2], t))
        return out

    part1, part2 = out_dir / "b_part1.gguf", out_dir / "b_part2.gguf"
    # part 1: a 1-row head (tied to a 1-row token_embd) so that requesting every row's output costs nothing
    _write(part1, src, {"qwen2.block_count": fork + 1, "qwen2.vocab_size": 1},
           [("token_embd.weight", np.zeros((1, info.hidden_size), np.float32))] + blocks(0, fork + 1)
           + [("output_norm.weight", np.ones(info.hidden_size, np.float32))])
    _write(part2, src, {"qwen2.block_count": n - fork - 1},
           [("token_embd.weight", by["output.weight"])] + blocks(fork + 1, n)
           + [("output_norm.weight", by["output_norm.weight"])])
    return part1, part2


# ------------------------------------------------------------------------------------------------ timing
def _median_ms(fn: Callable[[int], None], start: int, steps: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn(start + i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(files: Dict[str, Path], threads: int, steps: int, prompt: int, workdir: Path) -> Dict[str, float]:
    ggml = _init_backend()
    info = read_model_info(gguf.GGUFReader(str(files["trunk"])), str(files["trunk"]))
    h, fork = info.hidden_size, info.fork_layer
    n_ctx = prompt + 2 * (steps + 8)
    kw = dict(n_ctx=n_ctx, n_batch=max(prompt, 8), n_threads=threads, n_gpu_layers=0, exact=False)
    rng = np.random.default_rng(0)
    prompt_x = rng.standard_normal((prompt, h)).astype(np.float32) * 0.02
    step_x = rng.standard_normal((1, h)).astype(np.float32) * 0.02
    res: Dict[str, float] = {}

    # raw trunk, with / without head; idle callback
    trunk = LlamaModel(files["trunk"], **kw)
    for label, want in (("raw trunk (text head)", True), ("raw trunk, no head", False)):
        trunk.clear()
        trunk.decode(prompt_x, 0, True)
        res[label] = _median_ms(lambda p: trunk.decode(step_x, p, want), prompt, steps)
    trunk.close()
    # idle callback: asks for a tensor name that does not exist, so only the per-node ask calls remain
    cap_idle = HiddenCapture(ggml, "no-such-tensor", h)
    trunk_idle = LlamaModel(files["trunk"], capture=cap_idle, **kw)
    trunk_idle.decode(prompt_x, 0, True)
    res["idle callback (trunk)"] = _median_ms(lambda p: trunk_idle.decode(step_x, p, True), prompt, steps)
    trunk_idle.close()

    # A
    cap = HiddenCapture(ggml, f"l_out-{fork}", h)
    trunk = LlamaModel(files["trunk"], capture=cap, **kw)
    mimo = LlamaModel(files["audio"], **kw)
    hidden = {}

    def a_step(p: int, text_head: bool = True) -> None:
        trunk.decode(step_x, p, text_head)
        mimo.decode(cap.take(), p, True)

    for label, head in (("A: trunk+capture+MIMO", True), ("A, text ended (no trunk head)", False)):
        trunk.clear(), mimo.clear()
        trunk.decode(prompt_x, 0, True)
        mimo.decode(cap.take(), 0, True)
        res[label] = _median_ms(lambda p: a_step(p, head), prompt, steps)
    # logits of A at one fixed step, for the B check
    trunk.clear(), mimo.clear()
    trunk.decode(prompt_x, 0, True)
    mimo.decode(cap.take(), 0, True)
    hidden["A_text"] = trunk.decode(step_x, prompt, True)
    hidden["A_audio"] = mimo.decode(cap.take(), prompt, True)
    trunk.close()

    # B
    part1_path, part2_path = split_trunk(files["trunk"], workdir)
    cap1 = HiddenCapture(ggml, f"l_out-{fork}", h)
    part1 = LlamaModel(part1_path, capture=cap1, **kw)
    part2 = LlamaModel(part2_path, **kw)

    def b_prompt() -> None:
        for m in (part1, part2, mimo):
            m.clear()
        _decode_all_rows(part1, prompt_x, 0)
        hid = cap1.take()
        part2.decode(hid, 0, True)
        mimo.decode(hid, 0, True)

    def b_step(p: int, text: bool = True) -> None:
        part1.decode(step_x, p, True)
        hid = cap1.take()
        if text:
            part2.decode(hid, p, True)
        mimo.decode(hid, p, True)

    for label, text in (("B: part1+capture, part2, MIMO", True), ("B, text ended (part2 skipped)", False)):
        b_prompt()
        res[label] = _median_ms(lambda p: b_step(p, text), prompt, steps)
    b_prompt()
    part1.decode(step_x, prompt, True)
    hid = cap1.take()
    bt, ba = part2.decode(hid, prompt, True), mimo.decode(hid, prompt, True)
    res["check: max|A-B| text logits"] = float(np.abs(bt - hidden["A_text"]).max())
    res["check: max|A-B| audio logits"] = float(np.abs(ba - hidden["A_audio"]).max())
    for m in (part1, part2, mimo):
        m.close()

    # the backend's own step (embedding rows + adaptor-free step): the whole per-step host cost
    with LlamaCppBackend(files["trunk"], files["audio"], files.get("adaptor"), n_ctx=n_ctx, n_threads=threads) as be:
        ids = rng.integers(info.token_offset, info.vocab_size, prompt)
        be.prefill(ids, ids * 0 + 1, None, np.zeros(prompt, bool))
        res["LlamaCppBackend.step (A, with embedding rows)"] = _median_ms(lambda p: be.step(p % 7 + 1, 2), prompt,
                                                                          steps)
    return res


def _decode_all_rows(m: LlamaModel, x: np.ndarray, pos0: int) -> None:
    """Part 1 of B prunes its last layer to the output rows: request an output for every row (1-row head)."""
    for i in range(x.shape[0]):
        m.decode(x[i:i + 1], pos0 + i, True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--precision", choices=("f32", "f16"), default="f16")
    p.add_argument("--quant", default=None, help="also quantize (e.g. Q8_0, Q4_K_M) before measuring")
    p.add_argument("--gguf-dir", type=Path, default=None, help="reuse an existing export folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.gguf_dir is None:
            from kimia_edge.export.gguf_export import export_llm_gguf
            from kimia_edge.export.snapshot.llm import write_llm

            write_llm(tmp / "snap", a.size, 0)
            exp = export_llm_gguf(tmp / "snap", tmp / "gguf", a.precision)
            gdir = exp.trunk.parent
        else:
            gdir = a.gguf_dir
        label = f"{a.size if a.gguf_dir is None else gdir}, {a.precision}"
        if a.quant:
            from kimia_edge.export.gguf_quantize import quantize_llm

            quantize_llm(gdir, tmp / "quant", a.quant)
            gdir, label = tmp / "quant", label + f" -> {a.quant}"
        files = {"trunk": gdir / "llm_trunk.gguf", "audio": gdir / "llm_audio.gguf"}
        if (gdir / "llm_adaptor.gguf").exists():
            files["adaptor"] = gdir / "llm_adaptor.gguf"
        res = run(files, a.threads, a.steps, a.prompt, tmp)
    raw = res["raw trunk (text head)"]
    print(f"# LLM fork mechanisms — {machine_label()}")
    print(f"# model: {label}; threads {a.threads}; prompt {a.prompt}; median of {a.steps} steps")
    print(f"{'mechanism':48s} {'ms/step':>9s} {'x raw':>7s}")
    for k, v in res.items():
        if k.startswith("check"):
            print(f"{k:48s} {v:9.2e}")
        else:
            print(f"{k:48s} {v:9.3f} {v / raw:7.2f}")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine_label(), "model": label, "threads": a.threads,
                                      "results_ms": res}, indent=2))


if __name__ == "__main__":
    main()
