"""VAD accuracy and cost: Silero (ONNX, as the bundle ships it) vs the energy fallback, on real speech placed at known
positions inside silence and inside white / pink noise at stated SNRs (seeded).

Each condition is one signal: 3 s background, clip A, 4 s background, clip B, 4 s background, clip A, 3 s
background (clips: the 16 kHz speech in ../shared/audio). The true speech region of a clip runs from its first to its
last 10 ms frame within 25 dB of the clip's loudest frame (measured on the clean clip). The SNR is the power of
the speech inside those regions over the noise power. Both detectors get the signal in 20 ms blocks, as from a
microphone, with the runtime's default ``VadConfig``.

Reported per condition and detector: onset error (detected ``speech_started`` sample minus true onset, ms; the
event itself arrives ``min_speech_s`` later by design) and offset error (last ``speech_stopped`` sample of the
region minus true offset, ms), mean of |error| and max |error|; missed regions; false triggers (``speech_started`` more
than 0.5 s outside every true region, i.e. in pure silence / noise); RTF = processing time / signal duration.

    python bench/vad.py [--onnx silero_vad.onnx] [--md docs/vad.md] [--plot docs/vad.png]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

RATE = 16_000
BLOCK = 320  # 20 ms
TOLERANCE_S = 0.5
SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"


# ---- scoring (tests/test_vad_bench_metrics.py) -------------------------------------------------------------------
@dataclass
class Score:
    """Errors in samples per true region (None: missed), false triggers counted over the whole signal."""

    onset_errors: List[Optional[int]] = field(default_factory=list)
    offset_errors: List[Optional[int]] = field(default_factory=list)
    false_triggers: int = 0

    @property
    def missed(self) -> int:
        return sum(e is None for e in self.onset_errors)

    def stats_ms(self, which: str) -> Tuple[float, float]:
        """(mean |error|, max |error|) in ms over the detected regions; (nan, nan) if none."""
        errors = [abs(e) for e in getattr(self, f"{which}_errors") if e is not None]
        if not errors:
            return float("nan"), float("nan")
        return 1000.0 * float(np.mean(errors)) / RATE, 1000.0 * float(np.max(errors)) / RATE


def score(events: Sequence[Tuple[str, int]], regions: Sequence[Tuple[int, int]],
          tolerance: int = int(TOLERANCE_S * RATE)) -> Score:
    """Scores ``events`` ((kind, sample) in stream order) against the true speech ``regions`` ((on, off) samples,
    sorted, disjoint). Region i owns the events from ``on_i - tolerance`` to the next region's ``on - tolerance``:
    its onset error is the first start there no later than ``off_i`` minus ``on_i``, its offset error the last stop
    before any later start minus ``off_i``. A start farther than ``tolerance`` from every region is a false trigger."""
    out = Score()
    for i, (on, off) in enumerate(regions):
        end = regions[i + 1][0] - tolerance if i + 1 < len(regions) else None
        owned = [(k, s) for k, s in events if s >= on - tolerance and (end is None or s < end)]
        later = next((j for j, (k, s) in enumerate(owned) if k == "speech_started" and s > off), len(owned))
        owned = owned[:later]  # a start after the region begins something else (a false trigger), not its end
        starts = [s for k, s in owned if k == "speech_started"]
        stops = [s for k, s in owned if k == "speech_stopped" and starts and s >= starts[0]]
        out.onset_errors.append(starts[0] - on if starts else None)
        out.offset_errors.append(stops[-1] - off if starts and stops else None)
    out.false_triggers = sum(1 for k, s in events if k == "speech_started"
                             and all(s < on - tolerance or s > off + tolerance for on, off in regions))
    return out


def speech_region(clip: np.ndarray, floor_db: float = 25.0) -> Tuple[int, int]:
    """(first, end) sample of the clip's speech: its 10 ms frames within ``floor_db`` of the loudest frame."""
    frame = RATE // 100
    n = len(clip) // frame
    level = 10 * np.log10(np.mean(clip[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level >= level.max() - floor_db)
    return int(loud[0] * frame), int((loud[-1] + 1) * frame)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance 1/f noise [n] (white noise shaped by 1/sqrt(f) in the frequency domain)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / np.sqrt(f), n)
    return (x / x.std()).astype(np.float32)


def build_signal(clips: Sequence[np.ndarray], noise: Optional[str], snr_db: Optional[float], seed: int
                 ) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """The condition's signal and its true speech regions (see the module docstring)."""
    gaps = [3.0, 4.0, 4.0, 3.0]
    order = [clips[0], clips[1], clips[0]]
    parts, regions, pos = [], [], 0
    for gap, clip in zip(gaps, order):
        parts.append(np.zeros(int(gap * RATE), np.float32))
        pos += int(gap * RATE)
        a, b = speech_region(clip)
        regions.append((pos + a, pos + b))
        parts.append(clip)
        pos += len(clip)
    parts.append(np.zeros(int(gaps[-1] * RATE), np.float32))
    signal = np.concatenate(parts)
    if noise is not None:
        rng = np.random.default_rng(seed)
        shape = rng.standard_normal(len(signal)).astype(np.float32) if noise == "white" else pink_noise(len(signal), rng)
        speech_power = np.mean(np.concatenate([signal[a:b] for a, b in regions]) ** 2)
        signal = signal + shape * np.float32(np.sqrt(speech_power / 10 ** (snr_db / 10) / np.mean(shape ** 2)))
    return signal.astype(np.float32), regions


def run_detector(vad, signal: np.ndarray) -> Tuple[List[Tuple[str, int]], float]:
    """Events and RTF of ``vad`` fed ``signal`` in 20 ms blocks."""
    vad.reset()
    events: List[Tuple[str, int]] = []
    start = time.perf_counter()
    for i in range(0, len(signal), BLOCK):
        events += [(e.kind, e.sample) for e in vad.push(signal[i:i + BLOCK])]
    return events, (time.perf_counter() - start) / (len(signal) / RATE)


# ---- report ------------------------------------------------------------------------------------------------------
CONDITIONS = [("silence", None, None)] + [(f"{kind} {snr:g} dB", kind, snr)
                                          for kind in ("white", "pink") for snr in (20, 10, 5, 0)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kimia_edge.runtime.frontend import load_audio, to_16k_mono
    from kimia_edge.runtime.metrics import machine_label
    from kimia_edge.runtime.vad import EnergyVad, SileroVad, VadConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, help="Silero VAD graph (default: the installed silero-vad package's)")
    p.add_argument("--audio", type=Path, default=SHARED_AUDIO)
    p.add_argument("--md", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "vad.md")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside --md, vad.png)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    onnx = args.onnx
    if onnx is None:
        from kimia_edge.export.exporter import installed_vad

        found = installed_vad()
        if found is None:
            raise SystemExit("silero-vad is not installed: pass --onnx")
        onnx = found[0]
    clips = [to_16k_mono(*load_audio(f)) for f in sorted(args.audio.glob("*.wav"))]
    if len(clips) < 2:
        raise SystemExit(f"{args.audio}: need two 16 kHz speech clips")
    detectors = {"silero": SileroVad(onnx, VadConfig()), "energy": EnergyVad(VadConfig())}
    rows = []
    for c, (name, kind, snr) in enumerate(CONDITIONS):
        signal, regions = build_signal(clips, kind, snr, args.seed + c)
        for det_name, vad in detectors.items():
            events, rtf = run_detector(vad, signal)
            s = score(events, regions)
            rows.append({"condition": name, "detector": det_name, "onset": s.stats_ms("onset"),
                         "offset": s.stats_ms("offset"), "missed": s.missed, "regions": len(regions),
                         "false": s.false_triggers, "rtf": rtf, "seconds": len(signal) / RATE})
            print(f"{name:<14} {det_name:<7} onset {rows[-1]['onset'][0]:7.1f}/{rows[-1]['onset'][1]:7.1f} ms  "
                  f"offset {rows[-1]['offset'][0]:7.1f}/{rows[-1]['offset'][1]:7.1f} ms  missed {s.missed}  "
                  f"false {s.false_triggers}  RTF {rtf:.4f}")
    plot = args.plot or args.md.with_suffix(".png")
    write_markdown(args.md, rows, machine_label(), plot.name, [f.name for f in sorted(args.audio.glob("*.wav"))])
    write_plot(plot, rows, machine_label())
    print(f"wrote {args.md} and {plot}")
    return 0


def write_markdown(path: Path, rows: List[Dict], machine: str, plot_name: str, clip_names: List[str]) -> None:
    lines = [
        "# Voice activity detection: Silero (ONNX) vs energy",
        "",
        f"Measured by `bench/vad.py` on {machine}; clips {', '.join(clip_names)} (../shared/audio) placed three times "
        "in 17 s of background per condition, 20 ms blocks, default `VadConfig` (threshold 0.5, min speech 0.25 s, "
        "min silence 0.6 s). Errors are |detected - true| sample positions in ms, mean / max over the 3 regions; "
        "false = `speech_started` more than 0.5 s from any speech; RTF = processing time / audio time (one thread).",
        "",
        "The two clips differ in level: asr_example_zh.wav peaks at -33 dBFS with its speech mostly between -60 and "
        "-40 dBFS, below the energy detector's -40 dBFS threshold, so energy misses it (2 of 3 regions) even in "
        "silence; qa_example.wav peaks at -18 dBFS. Energy treats noise at 5 dB SNR and worse as one long utterance "
        "(a false trigger at the start, every region missed). Silero does not depend on the level and never "
        "triggered on noise here; its large onset errors at 5-10 dB SNR come from the quiet clip being found late.",
        "",
        "| condition | detector | onset mean / max (ms) | offset mean / max (ms) | missed | false triggers | RTF |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['condition']} | {r['detector']} | {r['onset'][0]:.0f} / {r['onset'][1]:.0f} | "
                     f"{r['offset'][0]:.0f} / {r['offset'][1]:.0f} | {r['missed']}/{r['regions']} | {r['false']} | "
                     f"{r['rtf']:.4f} |")
    lines += ["", f"![onset error and false triggers per condition]({plot_name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(path: Path, rows: List[Dict], machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    x = np.arange(len(conditions))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, det in enumerate(("silero", "energy")):
        mine = {r["condition"]: r for r in rows if r["detector"] == det}
        onset = [mine[c]["onset"][0] for c in conditions]
        false = [mine[c]["false"] + mine[c]["missed"] for c in conditions]
        axes[0].bar(x + (k - 0.5) * 0.4, onset, 0.4, label=det)
        axes[1].bar(x + (k - 0.5) * 0.4, false, 0.4, label=det)
    for ax, title in zip(axes, ("mean |onset error| (ms; missing bar = every region missed)",
                                "false triggers + missed regions")):
        ax.set_xticks(x, conditions, rotation=45, ha="right")
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.suptitle(f"VAD on speech in silence / noise — {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
