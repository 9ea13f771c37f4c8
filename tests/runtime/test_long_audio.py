"""Long recordings in ``transcribe``: split into pieces that fit the LLM's context (cut at the quietest point near
each window end, or where a pause finder says), transcribed one by one, the text joined; a bad file in the batch is
reported and the others still transcribe."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_edge.cli import main
from kimia_edge.runtime.long_audio import (EmptyTranscriptError, join_transcripts, max_piece_seconds,
                                           split_for_context, transcribe_pieces)

RATE = 16_000


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def test_pieces_cover_the_clip_within_the_window_and_cut_in_the_pause() -> None:
    clip = _speechlike(100)
    clip[int(27.0 * RATE):int(27.4 * RATE)] = 0  # a pause 3 s before the first window's end
    pieces = split_for_context(clip, 30, overlap_seconds=0.5)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(clip)
    assert all(0 < end - start <= 30 * RATE for start, end in pieces)
    assert all(b[0] == a[1] - RATE // 2 for a, b in zip(pieces, pieces[1:]))  # 0.5 s overlap
    assert 27.0 * RATE < pieces[0][1] < 27.4 * RATE
    assert split_for_context(clip[: 30 * RATE], 30) == [(0, 30 * RATE)]


def test_a_pause_finder_is_used_when_it_answers_inside_the_search_range() -> None:
    clip = _speechlike(70)
    asked = []

    def finder(samples: np.ndarray, lo: int, hi: int):
        asked.append((lo, hi))
        return hi - RATE if len(asked) == 1 else None  # the second time: no pause, the quietest point is used
    pieces = split_for_context(clip, 30, pause_finder=finder, overlap_seconds=0)
    assert pieces[0] == (0, 29 * RATE)
    assert asked[0] == (30 * RATE - 5 * RATE, 30 * RATE) and len(pieces) == 3
    assert asked[1][0] < pieces[1][1] <= asked[1][1]
    with pytest.raises(ValueError, match="at least 1 s"):
        split_for_context(clip, 0.5)


def test_the_piece_length_fits_the_context() -> None:
    assert max_piece_seconds(4096, 42, max_steps=3) == pytest.approx((4096 - 42 - 1 - 3) / 12.5, abs=0.1)
    assert max_piece_seconds(4096, 42) == pytest.approx((4096 - 42 - 1 - 32) / 20.5, abs=0.1)  # 8 text steps/s
    with pytest.raises(ValueError, match="no room"):
        max_piece_seconds(40, 42)


def test_joining_drops_what_the_overlap_repeats() -> None:
    assert join_transcripts(["the cat sat on", "sat on the mat", "", " mat."]) == "the cat sat on the mat."
    assert join_transcripts(["今天天气", "天气很好"]) == "今天天气很好"
    assert join_transcripts(["a", "b"]) == "a b"


def test_an_hour_is_not_needed_to_need_pieces(tiny_bundle: Path, shared_audio: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    # The tiny LLM runs with a 4 096-position context: with --max-steps 3 a piece holds at most
    # (4096 - 42 - 1 - 3) / 12.5 = 324 s. 24 x (10.4 s + 3.7 s) = 338 s needs two.
    one = np.concatenate([sf.read(str(shared_audio / name), dtype="float32")[0]
                          for name in ("asr_example_zh.wav", "qa_example.wav")])
    long = tmp_path / "long.wav"
    sf.write(str(long), np.tile(one, 24), RATE, subtype="PCM_16")
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(RATE, np.float32), RATE)
    code = main(["transcribe", "--bundle", str(tiny_bundle), str(silent), str(long), str(tmp_path / "gone.wav"),
                 str(shared_audio / "qa_example.wav"), "--max-steps", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 1  # two files failed; the two others are transcribed
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [Path(r["file"]).name for r in results] == ["long.wav", "qa_example.wav"]
    assert results[0]["pieces"] == 2 and results[0]["seconds"] > 330 and results[0]["text"].strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "silent.wav: silent" in errors[0] and "gone.wav: audio file not found" in errors[1]


def test_an_empty_transcript_is_an_error_not_a_result(tiny_bundle: Path) -> None:
    # The tiny model always says something; what the rule checks is the joined text, here of no piece at all.
    from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions
    from kimia_edge.runtime.tasks import generation_config

    pipe = Pipeline.from_bundle(tiny_bundle, PipelineOptions(text_only=True, threads=1))
    with pytest.raises(EmptyTranscriptError, match="empty transcript of 2.0 s of audible audio"):
        transcribe_pieces(pipe, _speechlike(2), [], lambda: generation_config("asr", 0, step_limit=2))
