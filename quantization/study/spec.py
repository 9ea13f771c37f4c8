"""What a study measures: the variants (``--variants SPEC``), the cells (variant x clip) and their on-disk names.

SPEC is a comma-separated list; each item is ``GRAPH=PRECISION`` (one ONNX graph), ``PRECISION`` (that ONNX
precision for every graph it applies to, per the registry), ``llm=GGUF`` or ``GGUF`` (an LLM variant: a llama.cpp
type such as ``Q8_0``, or a named row of ``quantization/llm_quality.VARIANTS`` by its slug such as
``Q4_K_M+emb-heads-Q8_0``, or a mix spec ``llm=Q4_K_M+trunk.blk.0-1=F32`` of ``quantization/gguf_mix.py``). Empty: every
registry precision for every graph and every LLM row.

The noise floor is always measured for each component a study touches and needs no spec: ``fp32`` (ONNX Runtime's
fp32 export vs the torch reference) and ``torch_threads`` (the torch reference with a second thread count vs
itself) per graph, ``F32_threads`` (the F32 GGUF with another thread count vs itself) for the LLM.

End-to-end mixes (``e2e:ONNX_SPEC@GGUF_ROW``, the component "e2e") and their floors: end_to_end.py.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from kimia_edge.runtime.spec.graphs import ONNX_GRAPHS
from kimia_edge.runtime.spec.precisions import ONNX_PRECISIONS, PRECISION_NAMES, precision_applies

__all__ = ["StudyVariant", "LLM", "E2E", "FLOOR_GRAPH", "FLOOR_LLM", "FLOOR_E2E", "parse_variants", "llm_rows",
           "slug", "clip_id", "Cell", "cell_list", "is_sensitivity_row"]

LLM = "llm"
FLOOR_GRAPH = ("fp32", "torch_threads")
FLOOR_LLM = ("F32_threads",)
E2E = "e2e"
FLOOR_E2E = ("fp32@F32", "noise_seed")  # end_to_end.py: the runtime at full precision; another noise seed
_ORDER = (*ONNX_GRAPHS, LLM, E2E)
# the GGUF mixes of sensitivity.py (assembled, measured, deleted): TYPE@ROLE.GROUP (one group) or TYPE~HASH (a trial)
_SENSITIVITY_ROW = re.compile(r"[A-Za-z0-9_.+-]+(?:@(?:trunk|audio)\.[A-Za-z0-9_.]+|~[0-9a-f]{12})")


def is_sensitivity_row(name: str) -> bool:
    """Whether ``name`` is a GGUF mix of the sensitivity study (``Q4_K_M@trunk.blk.3``, ``Q4_K_M~0123456789ab``)."""
    return _SENSITIVITY_ROW.fullmatch(name) is not None


def slug(name: str) -> str:
    """A file-name-safe id of an LLM row name ("Q4_K_M, emb+heads Q8_0" -> "Q4_K_M+emb-heads-Q8_0")."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "", name.replace(", ", "+").replace("+heads", "-heads").replace(" ", "-"))


def llm_rows():
    """{slug: llm_quality.Variant} of the LLM rows a study knows (F32 is the reference, not a row)."""
    from kimia_edge.quantization.llm_quality import VARIANTS, Variant

    rows = {slug(v.name): v for v in VARIANTS if v.qtype is not None}
    return rows, Variant


@dataclass(frozen=True, order=True)
class StudyVariant:
    """``component``: an ONNX graph name or "llm"; ``name``: precision (ONNX), row slug (LLM) or a floor name."""

    component: str
    name: str

    @property
    def floor(self) -> bool:
        return self.name in FLOOR_GRAPH + FLOOR_LLM + FLOOR_E2E

    @property
    def label(self) -> str:
        return f"{self.component}={self.name}"


def _gguf_row(name: str) -> str:
    rows, _ = llm_rows()
    if name in rows:
        return name
    from kimia_edge.export.gguf_quantize import QUANT_TYPES

    if name in QUANT_TYPES:
        return name
    if "+" in name:  # a per-tensor-group mix spec (quantization/gguf_mix.py), e.g. a --budget recommendation
        from kimia_edge.quantization.gguf_mix import parse_mix

        return parse_mix(name, tuple(QUANT_TYPES)).text
    raise ValueError(f"LLM variant {name!r}: expected a llama.cpp type (e.g. Q8_0) or one of {sorted(rows)}")


def parse_variants(spec: Optional[str]) -> List[StudyVariant]:
    """The measured variants of ``spec`` (see the module doc) plus the floor of every component they touch, sorted."""
    from kimia_edge.quantization.study.end_to_end import DEFAULT_MIXES, extract_mixes

    spec, mixes = extract_mixes(spec)
    chosen = {StudyVariant(E2E, m) for m in mixes}
    if not spec and not mixes:
        chosen |= {StudyVariant(g, p) for g in ONNX_GRAPHS for p in PRECISION_NAMES
                   if p != "fp32" and precision_applies(p, g)}
        chosen |= {StudyVariant(LLM, s) for s in llm_rows()[0]} | {StudyVariant(E2E, m) for m in DEFAULT_MIXES}
    else:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            component, _, name = item.rpartition("=")
            if item.startswith(LLM + "="):  # llm=MIX may hold '=' itself (Q4_K_M+trunk.blk.0=F32)
                component, _, name = item.partition("=")
            if component == LLM or (not component and name not in PRECISION_NAMES):
                chosen.add(StudyVariant(LLM, _gguf_row(name)))
            elif component and component not in ONNX_GRAPHS:
                raise ValueError(f"--variants {item!r}: no component {component!r}; components are "
                                 f"{(*ONNX_GRAPHS, LLM)}")
            elif name not in PRECISION_NAMES:
                raise ValueError(f"--variants {item!r}: ONNX precision must be one of {PRECISION_NAMES}")
            elif component and not precision_applies(name, component):
                raise ValueError(f"--variants {item!r}: the registry makes {name} of "
                                 f"{', '.join(ONNX_PRECISIONS[name].graphs)} only")
            else:
                chosen |= {StudyVariant(g, name) for g in ([component] if component else ONNX_GRAPHS)
                           if precision_applies(name, g)}
    for component in {v.component for v in chosen}:
        floors = {LLM: FLOOR_LLM, E2E: FLOOR_E2E}.get(component, FLOOR_GRAPH)
        chosen |= {StudyVariant(component, f) for f in floors}
    return sorted(chosen, key=lambda v: (_ORDER.index(v.component), not v.floor, v.name))


def clip_id(path: Path) -> str:
    """The clip's file stem and the first 8 hex digits of its content hash (two clips of one name stay apart)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(path).stem)}-{digest}"


@dataclass(frozen=True)
class Cell:
    variant: StudyVariant
    clip: str  # clip id

    @property
    def key(self) -> str:
        return f"{self.variant.component}__{self.variant.name}__{self.clip}"


def cell_list(variants: Sequence[StudyVariant], clips: Sequence[str]) -> List[Cell]:
    return [Cell(v, c) for c in clips for v in variants]


def split(variants: Sequence[StudyVariant]) -> Tuple[List[str], List[StudyVariant]]:
    """(the ONNX graphs touched, in export order; the LLM variants)."""
    graphs = [g for g in ONNX_GRAPHS if any(v.component == g for v in variants)]
    return graphs, [v for v in variants if v.component == LLM]
