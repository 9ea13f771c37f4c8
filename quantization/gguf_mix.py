"""Mixed-precision LLM GGUFs: per tensor group, from several GGUF files of one model (issue [Q] items 2 and 5).

Two ways to one mix:

- **Assembly** (``assemble_llm``): the tensors of each group are copied byte for byte (raw quantized data, tensor
  type and shape) from one of several GGUF files of the same model, e.g. layer 3 of the trunk from the Q4_K_M file
  and everything else from the F32 file, with ``gguf.GGUFReader`` / ``GGUFWriter``. Metadata comes from the first
  source. This is how the study measures one layer quantized alone in seconds, without running the quantizer.
- **Mix spec** (``parse_mix``), what ``kimia-edge export --llm-quants`` and ``kimia-edge study --variants llm=...``
  accept: ``BASE[+SCOPE=TYPE]...`` where BASE is a llama.cpp quant type (``Q4_K_M``), SCOPE a tensor group
  (``blk.0-3``, ``token_embd``, ``output``), optionally limited to one of the two files (``trunk.blk.2``,
  ``audio.blk.0``; no prefix = both), and TYPE a ggml tensor type (``F32``, ``F16``, ``Q8_0``, ``Q6_K``, ...).
  Example: ``Q4_K_M+trunk.blk.0-1=Q8_0+audio.output=F16``. The exporter hands the overrides to llama.cpp's own
  quantizer (``llama_model_quantize_params.tt_overrides``, llama.cpp's ``--tensor-type``: first matching regex
  wins); a tensor whose rows do not fit the asked type's blocks still falls back as llama.cpp decides.
  llama.cpp's K-quant mixes pick some tensors' types by their position among their kind (``use_more_bits`` on
  ``ffn_down`` / ``attn_v``), and an overridden tensor shifts that count for the rest; so every tensor the mix does
  not override is pinned to its type in the uniform BASE file (``pinned_types``). The exported mix then equals
  the assembly of the same groups from the uniform files byte for byte (tested).

The LLM is two GGUFs (``runtime/spec/gguf.py``): the trunk (``blk.0..N-1`` = the main layers, ``token_embd``,
``output`` = lm_head) and the audio branch (``blk.0..M-1`` = the MIMO layers, ``token_embd`` = its tied head). A
group is therefore named ``<role>.<group>``: ``trunk.blk.3``, ``audio.blk.0``, ``trunk.output``.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import gguf

from kimia_edge.runtime.spec.gguf import FILES as GGUF_FILES

__all__ = ["ROLES", "MixOverride", "MixSpec", "parse_mix", "is_mix", "pinned_types", "tensor_group", "file_groups",
           "assemble_gguf", "assemble_llm", "differing_groups"]

ROLES: Tuple[str, ...] = ("trunk", "audio")  # the two llama.cpp files; the adaptor (F32, numpy-side) is copied
_SCOPE = re.compile(r"^(?:(?P<role>trunk|audio)\.)?(?:blk\.(?P<a>\d+)(?:-(?P<b>\d+))?|(?P<name>[a-z_]+))$")


def tensor_group(name: str) -> str:
    """The group a tensor belongs to: ``blk.N`` for a layer's tensors, else the name without ``.weight``/``.bias``
    (``token_embd``, ``output``, ``output_norm``)."""
    m = re.match(r"^(blk\.\d+)\.", name)
    return m.group(1) if m else re.sub(r"\.(weight|bias)$", "", name)


@dataclass(frozen=True)
class MixOverride:
    """Tensors of ``group`` (``blk.A-B`` or a name; ``role`` None = both files) stored as ggml ``type``."""

    role: Optional[str]
    group: str
    type: str

    def layers(self) -> Optional[range]:
        m = _SCOPE.match(self.group)
        return None if m is None or m.group("a") is None else range(int(m["a"]), int(m["b"] or m["a"]) + 1)

    def matches(self, role: str, group: str) -> bool:
        if self.role not in (None, role):
            return False
        layers = self.layers()
        if layers is None:
            return group == self.group
        m = re.match(r"^blk\.(\d+)$", group)
        return m is not None and int(m.group(1)) in layers

    def regex(self) -> str:
        """llama.cpp's tensor-type pattern (``std::regex_search`` on the tensor name) for this group."""
        layers = self.layers()
        if layers is None:
            return rf"^{re.escape(self.group)}\."
        return rf"^blk\.({'|'.join(str(i) for i in layers)})\."

    @property
    def text(self) -> str:
        return f"{self.role + '.' if self.role else ''}{self.group}={self.type}"


@dataclass(frozen=True)
class MixSpec:
    """A llama.cpp quant type for every tensor, then per-group overrides (later ones win where they overlap)."""

    base: str
    overrides: Tuple[MixOverride, ...] = ()

    @property
    def text(self) -> str:
        return "+".join([self.base, *(o.text for o in self.overrides)])

    def type_for(self, role: str, group: str) -> Optional[str]:
        """The override type of ``role``'s ``group`` (None: the base type's rule decides)."""
        hit = [o.type for o in self.overrides if o.matches(role, group)]
        return hit[-1] if hit else None

    def tensor_types(self, role: str) -> List[Tuple[str, int]]:
        """[(regex, ggml type id)] for ``llama_model_quantize_params.tt_overrides`` of file ``role``, the last
        override first (llama.cpp takes the first match)."""
        return [(o.regex(), int(gguf.GGMLQuantizationType[o.type])) for o in reversed(self.overrides)
                if o.role in (None, role)]


def pinned_types(mix: MixSpec, role: str, source: Path, uniform: Path) -> List[Tuple[str, int]]:
    """The tensors of file ``role`` that the uniform ``mix.base`` quant ``uniform`` changed from ``source`` and
    that no override covers, each pinned to its type in ``uniform``: [(exact-name regex, ggml type id)]."""
    src = {t.name: t.tensor_type for t in gguf.GGUFReader(str(source)).tensors}
    return [(rf"^{re.escape(t.name)}$", int(t.tensor_type)) for t in gguf.GGUFReader(str(uniform)).tensors
            if t.tensor_type != src.get(t.name) and mix.type_for(role, tensor_group(t.name)) is None]


def is_mix(text: str) -> bool:
    """Whether ``text`` is a mix spec with at least one override (a plain quant type is not)."""
    return "+" in text and "=" in text


def parse_mix(text: str, base_types: Sequence[str]) -> MixSpec:
    """``"Q4_K_M+trunk.blk.0-3=Q8_0"`` -> MixSpec. ``base_types``: the quant types the quantizer knows.
    ValueError naming the part that is wrong."""
    base, *parts = [p.strip() for p in text.split("+")]
    if base not in base_types:
        raise ValueError(f"mix {text!r}: base {base!r} is not a quant type; expected one of {sorted(base_types)}")
    overrides = []
    for part in parts:
        scope, eq, qtype = part.partition("=")
        m = _SCOPE.match(scope.strip())
        if not eq or m is None:
            raise ValueError(f"mix {text!r}: {part!r} is not SCOPE=TYPE with SCOPE like blk.0-3, trunk.blk.2, "
                             f"audio.output or token_embd")
        if m["a"] is not None and m["b"] is not None and int(m["b"]) < int(m["a"]):
            raise ValueError(f"mix {text!r}: empty layer range {scope!r}")
        if qtype not in gguf.GGMLQuantizationType.__members__:
            raise ValueError(f"mix {text!r}: {qtype!r} is not a ggml tensor type (e.g. F32, F16, Q8_0, Q6_K, Q4_K)")
        group = scope.strip()[len(m["role"]) + 1:] if m["role"] else scope.strip()
        overrides.append(MixOverride(m["role"], group, qtype))
    return MixSpec(base, tuple(overrides))


# ----------------------------------------------------------------------------------------------------- assembly
def file_groups(path: Path) -> List[str]:
    """The tensor groups of one GGUF file, in file order."""
    seen: Dict[str, None] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        seen.setdefault(tensor_group(t.name), None)
    return list(seen)


def assemble_gguf(sources: Sequence[Path], pick: Callable[[str], int], dst: Path) -> Path:
    """Writes ``dst`` with the metadata of ``sources[0]`` and each tensor's raw data, type and shape copied from
    ``sources[pick(tensor_name)]``. Every source must hold the same tensor names with the same logical shapes
    (ValueError naming the first that differs). Written to ``dst.part`` first, then renamed."""
    readers = [gguf.GGUFReader(str(p)) for p in sources]
    base = readers[0]
    tables = [{t.name: t for t in r.tensors} for r in readers]
    for path, table in zip(sources[1:], tables[1:]):
        for t in base.tensors:
            other = table.get(t.name)
            if other is None or list(other.shape) != list(t.shape):
                raise ValueError(f"{path}: tensor {t.name} is missing or has another shape than in {sources[0]}: "
                                 "not the same model")
    chosen = []
    for t in base.tensors:
        i = pick(t.name)
        if not 0 <= i < len(sources):
            raise ValueError(f"pick({t.name!r}) = {i}: expected a source index below {len(sources)}")
        chosen.append((tables[i][t.name], readers[i]))
    arch = str(base.fields[gguf.Keys.General.ARCHITECTURE].contents())
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch, endianess=base.endianess)
    for field in base.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t, _ in chosen:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, r in chosen:
        writer.write_tensor_data(t.data, tensor_endianess=r.endianess)
    writer.close()
    tmp.replace(dst)
    return dst


def assemble_llm(folders: Sequence[Path], choose: Callable[[str, str], int], out_dir: Path) -> Dict[str, Path]:
    """The trunk and audio GGUFs of ``out_dir``, each group ``(role, group)`` taken from
    ``folders[choose(role, group)]`` (folders of the same model: an F32 export, llama.cpp quants of it); the
    adaptor is copied from ``folders[0]``. Returns {role: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}
    for role in ROLES:
        srcs = [Path(f) / GGUF_FILES[role] for f in folders]
        out[role] = assemble_gguf(srcs, lambda name, role=role: choose(role, tensor_group(name)),
                                  out_dir / GGUF_FILES[role])
    adaptor = Path(folders[0]) / GGUF_FILES["adaptor"]
    if adaptor.exists():
        out["adaptor"] = Path(shutil.copy2(adaptor, out_dir / GGUF_FILES["adaptor"]))
    return out


def differing_groups(a: Path, b: Path) -> List[Tuple[str, str]]:
    """(role, group) of every group whose tensors differ in type or bytes between the LLM folders ``a`` and ``b``
    (the groups a quant type really changes: on tiny shapes llama.cpp leaves some at their source type)."""
    out = []
    for role in ROLES:
        ta = {t.name: t for t in gguf.GGUFReader(str(Path(a) / GGUF_FILES[role])).tensors}
        tb = {t.name: t for t in gguf.GGUFReader(str(Path(b) / GGUF_FILES[role])).tensors}
        groups: Dict[str, bool] = {}
        for name, t in ta.items():
            u = tb[name]
            same = t.tensor_type == u.tensor_type and t.data.tobytes() == u.data.tobytes()
            groups[tensor_group(name)] = groups.get(tensor_group(name), False) or not same
        out += [(role, g) for g, differs in groups.items() if differs]
    return out
