"""What every run can report (architecture §6): first-audio latency, real-time factor per stage, LLM steps/s,
ring counters, the provider of every stage and peak memory — as a table for people and JSON for tools."""
from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from kimia_edge.runtime.streaming import TurnStats


def machine_label() -> str:
    """CPU model and core count, printed beside every benchmark figure."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def proc_status() -> Dict[str, int]:
    """This process's /proc/self/status numbers (Linux), e.g. ``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon`` (heap
    and other private memory), ``RssFile`` (resident pages of mapped files), ``Threads``; sizes in bytes. Empty
    where there is no /proc."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB: VmHWM of /proc/self/status, which belongs to the process
    image and starts again at exec. Not ``ru_maxrss`` where /proc exists: Linux carries it across fork + exec, so a
    process started by a larger one reports its parent's size at the fork (every cell of a study showed the study
    process's 2.4 GiB). Elsewhere (macOS) ``ru_maxrss``, bytes there."""
    hwm = proc_status().get("VmHWM")
    if hwm is not None:
        return hwm / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


@dataclass
class RunMetrics:
    """One turn. Times in seconds; RTF = processing time / audio duration (< 1 is faster than real time)."""

    input_audio_s: float
    encode_s: float
    prefill_s: float
    first_text_s: Optional[float]
    first_audio_s: Optional[float]  # from the end of the user's speech (start of the turn) to the first sample
    llm_steps: int
    llm_steps_per_s: float
    output_audio_s: float
    synth_rtf: Optional[float]  # detokenizer + vocoder time / output audio duration
    encode_rtf: float  # audio tokenizer time / input audio duration
    stop: str
    providers: Dict[str, str] = field(default_factory=dict)
    rings: Dict[str, Dict[str, int]] = field(default_factory=dict)
    peak_rss_mib: float = 0.0

    @classmethod
    def of(cls, turn: TurnStats, input_audio_s: float, encode_s: float, sample_rate_hz: int,
           providers: Dict[str, str]) -> "RunMetrics":
        out_s = turn.audio_samples / sample_rate_hz
        return cls(
            input_audio_s=input_audio_s, encode_s=encode_s, prefill_s=turn.prefill_s,
            first_text_s=None if turn.first_text_s is None else encode_s + turn.first_text_s,
            first_audio_s=None if turn.first_audio_s is None else encode_s + turn.first_audio_s,
            llm_steps=turn.llm_steps, llm_steps_per_s=turn.llm_steps_per_s, output_audio_s=out_s,
            synth_rtf=turn.synth_seconds / out_s if out_s else None,
            encode_rtf=encode_s / input_audio_s if input_audio_s else 0.0,
            stop=turn.stop, providers=dict(providers), rings=turn.rings, peak_rss_mib=peak_rss_mib(),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        def f(v: Any, unit: str = "", digits: int = 3) -> str:
            return "-" if v is None else f"{v:.{digits}f}{unit}"

        rows = [
            ("input audio", f(self.input_audio_s, " s", 2)),
            ("audio tokenizer", f"{f(self.encode_s, ' s')} (RTF {f(self.encode_rtf)})"),
            ("LLM prefill", f(self.prefill_s, " s")),
            ("LLM decode", f"{self.llm_steps} steps, {f(self.llm_steps_per_s, ' steps/s', 1)} (stop: {self.stop})"),
            ("first text", f(self.first_text_s, " s")),
            ("first audio", f(self.first_audio_s, " s")),
            ("output audio", f"{f(self.output_audio_s, ' s', 2)} (detokenizer+vocoder RTF {f(self.synth_rtf)})"),
            ("peak memory", f(self.peak_rss_mib, " MiB", 0)),
        ]
        rows += [(f"provider: {k}", v) for k, v in self.providers.items()]
        for name, c in self.rings.items():
            rows.append((f"ring: {name}", f"written {c['total_written']}, read {c['total_read']}, high water "
                                          f"{c['high_water']}, overruns {c['overruns']}, underruns {c['underruns']}, dropped {c['dropped']}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
