"""Quantized variants of the LLM GGUF files, made by llama.cpp's own quantizer (`llama_model_quantize`).

Input: the F32 (or F16) export of ``gguf_export`` (trunk + audio; the adaptor is F32 numpy-side and copied as is).
Output: ``<out_dir>/llm_trunk.gguf``, ``llm_audio.gguf`` (+ ``llm_adaptor.gguf``) at one of ``QUANT_TYPES``.
The quantizer keeps every metadata key (our ``kimia.*`` ones included) and, for the audio file whose head is the
tied ``token_embd``, quantizes that tensor as an output head (llama.cpp's rule for models without ``output``).

K-quants need rows that are multiples of 256 values (else llama.cpp falls back to a legacy type per tensor) and
Q8_0 rows that are multiples of 32 (else F16): a tiny test model therefore ends up partly unquantized.

A mix spec (``Q4_K_M+trunk.blk.0-3=Q8_0``, ``quantization/gguf_mix.py``) is quantized at its base type with the
per-tensor-group types handed to llama.cpp as ``tt_overrides`` (llama.cpp's ``--tensor-type``), per file.

The quantizer runs in a child process by default: a llama.cpp ``GGML_ASSERT`` aborts the whole process
(environment notes), and the parent should survive a bad input.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from kimia_edge.runtime.spec.gguf import FILES as GGUF_FILES

__all__ = ["QUANT_TYPES", "TENSOR_TYPES", "quantize_gguf", "quantize_llm", "check_quant_spec", "QuantizeError"]

# name -> llama_ftype (llama.h enum llama_ftype)
QUANT_TYPES: Dict[str, int] = {
    "F16": 1,       # LLAMA_FTYPE_MOSTLY_F16
    "Q8_0": 7,      # LLAMA_FTYPE_MOSTLY_Q8_0
    "Q6_K": 18,     # LLAMA_FTYPE_MOSTLY_Q6_K
    "Q5_K_M": 17,   # LLAMA_FTYPE_MOSTLY_Q5_K_M
    "Q4_K_M": 15,   # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "Q4_K_S": 14,   # LLAMA_FTYPE_MOSTLY_Q4_K_S
    "Q3_K_M": 12,   # LLAMA_FTYPE_MOSTLY_Q3_K_M
    "Q3_K_S": 11,   # LLAMA_FTYPE_MOSTLY_Q3_K_S
    "Q2_K": 10,     # LLAMA_FTYPE_MOSTLY_Q2_K
    "IQ4_XS": 30,   # LLAMA_FTYPE_MOSTLY_IQ4_XS
    "IQ3_M": 27,    # LLAMA_FTYPE_MOSTLY_IQ3_M
}  # the IQ2 / IQ1 types (and Q2_K_S) are left out: llama.cpp refuses them without an importance matrix
# name -> ggml_type (ggml.h enum ggml_type), for output_tensor_type / token_embedding_type overrides
TENSOR_TYPES: Dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

_QUANTIZED_ROLES = ("trunk", "audio")  # the adaptor stays F32 and is copied


class QuantizeError(RuntimeError):
    """llama_model_quantize failed (or its process died)."""


def _quantize_inprocess(src: str, dst: str, ftype: int, output_type: Optional[int], embedding_type: Optional[int],
                        nthread: int, tensor_types: Sequence[Sequence] = ()) -> int:
    import llama_cpp as llama

    llama.llama_backend_init()
    p = llama.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = nthread
    if output_type is not None:
        p.output_tensor_type = output_type
    if embedding_type is not None:
        p.token_embedding_type = embedding_type
    if tensor_types:  # [(regex, ggml type)], terminated by a null pattern
        table = (llama.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, ggml_type) in enumerate(tensor_types):
            table[i].pattern, table[i].type = str(pattern).encode(), int(ggml_type)
        p.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama.llama_model_tensor_override))
    return int(llama.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))


def quantize_gguf(src: Path, dst: Path, qtype: str, *, output_type: Optional[str] = None,
                  token_embedding_type: Optional[str] = None, nthread: int = 0, isolate: bool = True,
                  tensor_types: Sequence[Tuple[str, int]] = ()) -> Path:
    """Quantizes one llama.cpp GGUF ``src`` to ``dst`` at ``qtype`` (a key of QUANT_TYPES).

    tensor_types: [(regex on tensor names, ggml type id)], the first match wins (``gguf_mix.MixSpec``).
    output_type / token_embedding_type: keep ``output`` / ``token_embd`` at their own type (a key of TENSOR_TYPES,
    e.g. "Q8_0" or "F16"); None = llama.cpp's rule for the ftype. isolate: run in a child process."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype: expected one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    for name, v in (("output_type", output_type), ("token_embedding_type", token_embedding_type)):
        if v is not None and v not in TENSOR_TYPES:
            raise ValueError(f"{name}: expected one of {sorted(TENSOR_TYPES)}, got {v!r}")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    args = (str(src), str(tmp), QUANT_TYPES[qtype],
            None if output_type is None else TENSOR_TYPES[output_type],
            None if token_embedding_type is None else TENSOR_TYPES[token_embedding_type], nthread,
            [list(t) for t in tensor_types])
    if isolate:
        code = ("import json,sys;from kimia_edge.export.gguf_quantize import _quantize_inprocess as q;"
                "sys.exit(q(*json.loads(sys.argv[1])))")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
        rc = proc.returncode
        detail = (proc.stderr or "").strip().splitlines()[-5:]
    else:
        rc = _quantize_inprocess(*args)
        detail = []
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise QuantizeError(f"{src} -> {qtype}: llama_model_quantize failed (exit {rc}) " + " | ".join(detail))
    tmp.replace(dst)
    return dst


def check_quant_spec(qtype: str):
    """``qtype`` (a key of QUANT_TYPES or a mix spec of one) as a ``gguf_mix.MixSpec``; ValueError naming what is
    wrong."""
    from kimia_edge.quantization.gguf_mix import MixSpec, parse_mix

    if "+" in qtype:
        return parse_mix(qtype, tuple(QUANT_TYPES))
    if qtype not in QUANT_TYPES:
        raise ValueError(f"llama.cpp quant {qtype!r}: expected one of {sorted(QUANT_TYPES)} or a mix such as "
                         "Q4_K_M+trunk.blk.0-3=Q8_0")
    return MixSpec(qtype)


def quantize_llm(export_dir: Path, out_dir: Path, qtype: str, *, output_type: Optional[str] = None,
                 token_embedding_type: Optional[str] = None, nthread: int = 0) -> Dict[str, Path]:
    """Quantizes the trunk and audio GGUFs of ``export_dir`` into ``out_dir``; copies the F32 adaptor. ``qtype``: a
    key of QUANT_TYPES or a mix spec of one (``Q4_K_M+trunk.blk.0-3=Q8_0``, see ``quantization/gguf_mix.py``)."""
    from kimia_edge.quantization.gguf_mix import pinned_types

    mix = check_quant_spec(qtype)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if export_dir.resolve() == out_dir.resolve():
        raise ValueError("out_dir must differ from export_dir (same file names)")
    out: Dict[str, Path] = {}
    for role in _QUANTIZED_ROLES:
        src, dst = export_dir / GGUF_FILES[role], out_dir / GGUF_FILES[role]
        kw = dict(output_type=output_type, token_embedding_type=token_embedding_type, nthread=nthread)
        pins = []
        if mix.overrides:  # the uniform base first: its per-tensor types pin what the mix leaves alone
            uniform = quantize_gguf(src, dst.with_name(dst.name + ".uniform"), mix.base, **kw)
            pins = pinned_types(mix, role, src, uniform)
            uniform.unlink()
        out[role] = quantize_gguf(src, dst, mix.base, tensor_types=[*mix.tensor_types(role), *pins], **kw)
    adaptor = GGUF_FILES["adaptor"]
    if (export_dir / adaptor).exists():
        out["adaptor"] = Path(shutil.copy2(export_dir / adaptor, out_dir / adaptor))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Quantize the Kimi-Audio LLM GGUF files with llama.cpp")
    p.add_argument("export_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--type", dest="qtype", choices=sorted(QUANT_TYPES), default="Q4_K_M")
    p.add_argument("--output-type", choices=sorted(TENSOR_TYPES))
    p.add_argument("--token-embedding-type", choices=sorted(TENSOR_TYPES))
    a = p.parse_args(argv)
    files = quantize_llm(a.export_dir, a.out_dir, a.qtype, output_type=a.output_type,
                         token_embedding_type=a.token_embedding_type)
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))


if __name__ == "__main__":
    main()
