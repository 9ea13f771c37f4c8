"""Run-time sub-commands of ``kimia-edge`` (torch-free)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional


def _selfcheck(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.selfcheck import run_selfcheck

    return run_selfcheck()


def _bundle_verify(args: argparse.Namespace) -> int:
    from kimia_edge.runtime.bundle import read_manifest, verify_bundle
    from kimia_edge.runtime.spec.manifest import BundleError

    try:
        manifest = read_manifest(args.bundle)
        problems = verify_bundle(args.bundle)
    except BundleError as e:
        print(f"FAIL {e}")
        return 1
    for a in manifest.artifacts:
        print(f"  {a.name:<18} {a.format:<8} {a.precision:<12} {a.bytes / 1e6:10.2f} MB")
    for p in problems:
        print(f"FAIL {p}")
    print(f"{'FAIL' if problems else 'ok'}: {args.bundle} (format {manifest.format} v{manifest.version}, {len(manifest.artifacts)} artifacts)")
    return 1 if problems else 0


class _Output:
    """Where a turn's speech goes: a wav file (written at the end) and/or the speaker (played as it arrives)."""

    def __init__(self, wav_path: Optional[Path], speaker: bool, sample_rate_hz: int) -> None:
        self.wav_path, self.rate, self.pieces = wav_path, sample_rate_hz, []
        self.speaker = None
        if speaker:
            from kimia_edge.runtime.audio_io import Speaker
            from kimia_edge.runtime.rings import AudioRing

            self.speaker = Speaker(AudioRing(sample_rate_hz * 120, "block"), sample_rate_hz)
            self.speaker.start()

    def add(self, samples) -> None:
        if self.wav_path is not None:
            self.pieces.append(samples)
        if self.speaker is not None:
            self.speaker.ring.write(samples)

    def close(self, write: bool) -> None:
        """Stops playback; writes the wav only if the turn ran (no empty answer file after an error)."""
        import numpy as np
        import soundfile as sf

        if self.speaker is not None:
            self.speaker.ring.close()
            self.speaker.drain_and_stop()
        if self.wav_path is not None and write:
            wav = np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)
            sf.write(str(self.wav_path), wav, self.rate, subtype="FLOAT")
            print(f"wrote {self.wav_path}: {wav.size / self.rate:.2f} s at {self.rate} Hz", file=sys.stderr)


def options_from_args(args: argparse.Namespace, text_only: bool = False):
    """The one ``PipelineOptions`` every runtime verb opens its bundle with."""
    from kimia_edge.runtime.pipeline import PipelineOptions

    streaming = {"first_chunk_tokens": args.first_chunk_tokens} if args.first_chunk_tokens else {}
    options = PipelineOptions(precision=args.precision, llm_precision=args.llm_precision, device=args.device,
                              threads=args.threads, n_gpu_layers=args.n_gpu_layers, streaming=streaming,
                              text_only=text_only, prepack=not args.fast_start, low_memory=args.low_memory,
                              schedule=args.schedule, pipelined_synthesis=args.pipelined_synthesis)
    try:
        options.validate()
    except ValueError as e:
        raise OptionError(str(e)) from None
    return options


class OptionError(ValueError):
    """A command-line option the pipeline refuses (reported in one line by ``_guarded``)."""


def _pipeline(args: argparse.Namespace, text_only: bool = False):
    from kimia_edge.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(args.bundle, options_from_args(args, text_only))


def _chat(args: argparse.Namespace) -> int:
    import json

    from kimia_edge.runtime.frontend import load_audio
    from kimia_edge.runtime.streaming import AudioEvent, TextEvent
    from kimia_edge.runtime.tasks import generation_config

    if args.task == "chat" and args.output is None and not args.speaker:
        print("error: chat answers with speech: give --output FILE.wav and/or --speaker (or --task qa for text only)",
              file=sys.stderr)
        return 2
    if args.output is not None:
        _check_writable(args.output)
    pipe = _pipeline(args)
    conversation = pipe.conversation(keep_history=args.mic)
    if args.mic and args.speaker and not args.half_duplex and args.output is None:  # the wav writer is half duplex
        return _chat_duplex(args, pipe, conversation)
    out = _Output(args.output, args.speaker, pipe.c.output_sample_rate_hz)
    turns, ok = 0, False
    try:
        while True:
            if args.mic:
                from kimia_edge.runtime.audio_io import MIC_RATE_HZ, Microphone

                print("listening… (speak, then pause)", file=sys.stderr)
                samples, rate = Microphone(args.mic_device).record(push_to_talk=False), MIC_RATE_HZ
            else:
                samples, rate = load_audio(args.input)
            config = generation_config(args.task, args.seed, step_limit=args.max_steps)
            for event in conversation.turn(samples, rate, args.task, config=config, seed=args.seed):
                if isinstance(event, TextEvent) and not args.json:
                    print(event.text, end="", flush=True)
                elif isinstance(event, AudioEvent):
                    out.add(event.samples)
            turns += 1
            if args.json:
                last = conversation.last
                print(json.dumps({"text": last.text, "metrics": json.loads(last.metrics.to_json())}, ensure_ascii=False))
            else:
                print("\n" + conversation.last.metrics.table(), file=sys.stderr)
            if not args.mic or (args.turns and turns >= args.turns):
                break
        ok = True
    except KeyboardInterrupt:
        ok = turns > 0
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        out.close(write=ok)
    return 0


def _chat_duplex(args: argparse.Namespace, pipe, conversation) -> int:
    """``chat --mic --speaker``: the microphone keeps listening while the answer plays. The decisions are
    runtime/duplex.DuplexController's; this function only moves blocks and acts: on a barge-in it flushes the
    speaker, cancels the turn and cuts the history to what was played; every finished utterance is the next turn
    (run on a worker thread so that listening never stops)."""
    import threading

    from kimia_edge.runtime.audio_io import MIC_RATE_HZ, Microphone, Speaker
    from kimia_edge.runtime.duplex import BargeIn, DuplexController
    from kimia_edge.runtime.rings import AudioRing
    from kimia_edge.runtime.streaming import AudioEvent, HistoryTrimmedEvent, TextEvent
    from kimia_edge.runtime.tasks import generation_config
    from kimia_edge.runtime.vad import open_vad

    rate = pipe.c.output_sample_rate_hz
    speaker = Speaker(AudioRing(rate * 120, "block"), rate)
    controller = DuplexController(open_vad(args.bundle))
    config = generation_config(args.task, args.seed, step_limit=args.max_steps)
    worker: Optional[threading.Thread] = None
    errors: list = []
    base, turns = 0, 0

    def run(clip) -> None:
        try:
            for event in conversation.turn(clip, MIC_RATE_HZ, args.task, config=config, seed=args.seed):
                if isinstance(event, TextEvent):
                    print(event.text, end="", flush=True)
                elif isinstance(event, AudioEvent):
                    speaker.ring.write(event.samples)
                elif isinstance(event, HistoryTrimmedEvent):
                    print(f"[{event.reason}]", file=sys.stderr)
            print("\n" + conversation.last.metrics.table(), file=sys.stderr)
        except BaseException as exc:  # re-raised by the listening loop
            errors.append(exc)

    speaker.start()
    print("listening… (speak; speaking while the answer plays interrupts it; headphones avoid self-interruption)",
          file=sys.stderr)
    try:
        with Microphone(args.mic_device).listen() as blocks:
            while True:
                if errors:
                    raise errors[0]
                busy = worker is not None and worker.is_alive()
                if args.turns and turns >= args.turns and not busy and speaker.ring.available == 0:
                    break
                answering = busy or speaker.ring.available > 0
                for action in controller.push(blocks.get(), speaker.played_samples - base if answering else None):
                    if isinstance(action, BargeIn):
                        speaker.flush(wait_s=0.1)
                        conversation.cancel()
                        if worker is not None:
                            worker.join()
                        kept = conversation.truncate_last(speaker.played_samples - base)
                        print(f"\n[interrupted; the answer keeps: {kept!r}]", file=sys.stderr)
                    elif not (args.turns and turns >= args.turns):
                        base, turns = speaker.played_samples, turns + 1
                        worker = threading.Thread(target=run, args=(action.samples,), name="kimia-turn", daemon=True)
                        worker.start()
    except KeyboardInterrupt:
        conversation.cancel()
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if worker is not None:
            conversation.cancel()
            worker.join()
        speaker.ring.close()
        speaker.drain_and_stop()
    return 0


def _check_writable(path: Path) -> None:
    """Raises FileNotFoundError naming ``path`` if the answer could not be written there (checked before the turn
    runs, not after it)."""
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK) or \
            (path.exists() and not os.access(path, os.W_OK)):
        raise FileNotFoundError(f"cannot write the answer to {path} (missing folder, a folder, or no permission)")


def _transcribe(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from kimia_edge.runtime.frontend import SAMPLE_RATE_HZ, check_audible, load_audio, to_16k_mono
    from kimia_edge.runtime.long_audio import plan_pieces, transcribe_pieces
    from kimia_edge.runtime.tasks import generation_config

    pipe = _pipeline(args, text_only=True)
    failed = 0
    for path in tqdm(args.inputs, desc="transcribe", unit="file", disable=len(args.inputs) < 2):
        try:  # one bad, silent or too long file does not lose the others: each error is a line, the exit code 1
            samples, rate = load_audio(path)
            check_audible(samples, str(path))
            clip = to_16k_mono(samples, rate)
            pieces = plan_pieces(pipe, clip, args.max_steps)  # a recording longer than the context: several
            with tqdm(total=len(pieces), desc=path.name, unit="piece", leave=False, disable=len(pieces) < 2) as bar:
                text = transcribe_pieces(pipe, clip, pieces, lambda: generation_config(
                    "asr", args.seed, step_limit=args.max_steps), on_piece=bar.update)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - reported per file, with its type unless it is one of ours
            failed += 1
            what = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            tqdm.write(f"error: {what}" if str(path) in what else f"error: {path}: {what}", file=sys.stderr)
            continue
        line = {"file": str(path), "text": text, "seconds": round(len(clip) / SAMPLE_RATE_HZ, 2), "pieces": len(pieces)}
        tqdm.write(json.dumps(line, ensure_ascii=False) if args.json else f"{path}: {text}")
    return 1 if failed else 0


def _precisions(text: str) -> str:
    from kimia_edge.runtime.spec.precisions import parse_precision_spec

    try:
        parse_precision_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _count(minimum: int):
    """argparse type: an int >= ``minimum``, refused with the reason otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected >= {minimum}, got {value}")
        return value
    return parse


def _max_threads() -> int:
    """More threads than 4 per core only slow a run down (and in the thousands, llama.cpp and ONNX Runtime spend
    minutes creating them)."""
    return 4 * (os.cpu_count() or 1)


def _threads(text: str) -> int:
    value = _count(1)(text)
    if value > _max_threads():
        raise argparse.ArgumentTypeError(f"expected 1..{_max_threads()} (4 per core of the {os.cpu_count()} here), "
                                         f"got {value}")
    return value


def _runtime_options(p: argparse.ArgumentParser) -> None:
    from kimia_edge.runtime.sessions import DEVICES
    from kimia_edge.runtime.spec.precisions import PRECISION_NAMES
    from kimia_edge.runtime.spec.streaming import SCHEDULES

    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--precision", type=_precisions,
                   help=f"ONNX variant of every graph ({' | '.join(PRECISION_NAMES)}), or a default and per-graph "
                        "choices, e.g. fp32,dit_step=int8_dynamic (the fastest CPU mix measured); default: fp32 on a "
                        "CPU, fp16 on a GPU")
    p.add_argument("--llm-precision", help="GGUF variant (default: the smallest in the bundle)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=_threads, help=f"CPU threads (1..{_max_threads()}: 4 per core here)")
    p.add_argument("--n-gpu-layers", type=_count(0), default=0, help="LLM layers on the GPU (untested on GPU)")
    p.add_argument("--first-chunk-tokens", type=_count(1), help="smaller first detokenizer chunk = earlier first audio")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="official",
                   help="detokenizer chunk schedule: official (30-token chunks), first10 (10 then 30), growing "
                        "(10, 20, then 30): earlier first audio (docs/benchmarks.md); --first-chunk-tokens overrides "
                        "its first chunk")
    p.add_argument("--pipelined-synthesis", action=argparse.BooleanOptionalAction, default=False,
                   help="run the vocoder of one chunk beside the DiT of the next (same samples; docs/benchmarks.md)")
    p.add_argument("--max-steps", type=_count(1), help="cap on generation steps (not official)")
    p.add_argument("--seed", type=_count(0))
    p.add_argument("--json", action="store_true", help="print results and metrics as JSON")
    p.add_argument("--fast-start", action="store_true",
                   help="open the ONNX graphs and the LLM without repacking their weights: ready in seconds instead "
                        "of a minute at full size, no private copy of the weights (computed on the mapped files), "
                        "synthesis somewhat slower (docs/benchmarks.md)")
    p.add_argument("--low-memory", action="store_true",
                   help="open the audio encoders for each turn and free them after encoding, open the DiT and vocoder "
                        "only for a spoken answer and free them after it: less peak memory, each turn pays the "
                        "opening (pair it with --fast-start; docs/benchmarks.md)")


def _guarded(handler):
    """Bad input ends the command with a one-line reason (exit 2), not a traceback."""
    def run(args: argparse.Namespace) -> int:
        from kimia_edge.runtime.audio_io import AudioDeviceError
        from kimia_edge.runtime.frontend import AudioFileError
        from kimia_edge.runtime.generation import ContextFullError
        from kimia_edge.runtime.sessions import ProviderUnavailable
        from kimia_edge.runtime.spec.manifest import BundleError

        try:
            return handler(args)
        except (AudioFileError, BundleError, AudioDeviceError, FileNotFoundError, ProviderUnavailable,
                ContextFullError, PermissionError, OptionError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("selfcheck", help="check that the native extension and the run-time libraries work here")
    p.set_defaults(handler=_selfcheck)

    bundle = sub.add_parser("bundle", help="inspect bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION")
    verify = bundle_sub.add_parser("verify", help="check every artifact's size and sha256 and the bundle version")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(handler=_bundle_verify)

    chat = sub.add_parser("chat", help="speech conversation: speech in, text + speech out (streamed)")
    _runtime_options(chat)
    src = chat.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="speech file (any rate, any number of channels)")
    src.add_argument("--mic", action="store_true", help="live microphone, one utterance per turn, with history")
    chat.add_argument("--mic-device", help="sounddevice input device (name or index)")
    chat.add_argument("--turns", type=_count(1), help="with --mic: stop after this many turns (default: until Ctrl-C)")
    chat.add_argument("--half-duplex", action="store_true",
                      help="with --mic --speaker: stop listening while the answer plays (default: full duplex, "
                           "speaking interrupts the answer; the VAD is the bundle's Silero, else energy)")
    dst = chat.add_argument_group("output (at least one)")
    dst.add_argument("--output", type=Path, help="write the spoken answer here (24 kHz wav)")
    dst.add_argument("--speaker", action="store_true", help="play the answer while it is generated")
    chat.add_argument("--task", default="chat", choices=("chat", "qa", "asr"))
    chat.set_defaults(handler=_guarded(_chat))

    tr = sub.add_parser("transcribe", help="speech to text (ASR), one line per file")
    _runtime_options(tr)
    tr.add_argument("inputs", type=Path, nargs="+")
    tr.set_defaults(handler=_guarded(_transcribe))
    from kimia_edge.runtime.server_cli import register as register_serve

    register_serve(sub)  # serve
    from kimia_edge.runtime.engines_cli import register as register_engines

    register_engines(sub)  # engines build
