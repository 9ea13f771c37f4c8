"""Prompt builder: exact streams of the official prompt-manager fixture, and the layout table per task."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from kimia_edge.runtime.prompt import AudioEncoding, Message, build_prompt
from kimia_edge.runtime.special_tokens import SpecialTokens

T = SpecialTokens()
OFFSET = 152064
STUB_TEXT_OFFSET = 1000  # fixture text tokenizer stub: UTF-8 bytes + 1000 (PATCHES.md P-SELF)


def stub_text(text: str) -> list:
    return [b + STUB_TEXT_OFFSET for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def fixture(official_fixtures):
    pm = official_fixtures / "prompt_manager"
    meta = json.loads((pm / "meta.json").read_text())
    io = load_file(str(pm / "io.safetensors"))
    glm = load_file(str(official_fixtures / "glm_vq" / "io.safetensors"))
    return meta, io, glm


@pytest.mark.parametrize("case", ["asr", "a2a", "multiturn"])
def test_fixture_streams_exact(fixture, case):
    meta, io, glm = fixture
    chat = meta["chats"][case]
    tokens = SpecialTokens.from_mapping(meta["special_tokens"], pad=meta["pad_id"])
    assert tokens == T  # the fixture used the documented ids
    n_audio = [0]

    def audio(path: str) -> AudioEncoding:
        clip = path.split(".")[0]  # "A.wav" -> official GLM tokens of wave A (glm_vq fixture, same waves)
        k = n_audio[0]
        n_audio[0] += 1
        return AudioEncoding(glm[f"single.{clip}.token_ids"][0], io[f"{case}.whisper_feat{k}"][0])

    p = build_prompt(chat["messages"], chat["output_type"], tokens, meta["kimia_token_offset"], stub_text, audio)
    assert len(p) == chat["L"]
    np.testing.assert_array_equal(p.audio_ids, io[f"{case}.audio_ids"][0])
    np.testing.assert_array_equal(p.text_ids, io[f"{case}.text_ids"][0])
    np.testing.assert_array_equal(p.continuous_mask, io[f"{case}.is_continuous_mask"][0].astype(bool))
    # features: one block per audio message, at its span, rows = the official whisper features
    assert len(p.spans) == len(p.features) == len(chat["whisper_feat_shapes"])
    for k, span in enumerate(p.spans):
        assert p.audio_ids[span.start - 1] == T.media_begin and p.audio_ids[span.start + span.length] == T.media_end
        np.testing.assert_array_equal(p.features[k], io[f"{case}.whisper_feat{k}"][0][: span.length])
    stacked = p.stacked_features()
    assert stacked.shape[0] == int(p.continuous_mask.sum())


def _sem(n: int, start: int = 7) -> AudioEncoding:
    return AudioEncoding(np.arange(start, start + n), np.ones((n, 4), np.float32))


def test_asr_layout_table():
    text = [11, 12, 13]
    p = build_prompt([Message("user", "text", "t"), Message("user", "audio", "x")], "text", T, OFFSET,
                     lambda s: text, lambda c: _sem(4))
    blank = T.text_blank
    exp_a = [T.kimia_user_msg_start, blank, blank, blank, T.media_begin, *(OFFSET + np.arange(7, 11)), T.media_end,
             T.speech_ct, T.msg_end, T.kimia_assistant_msg_start]
    exp_t = [blank, *text] + [blank] * (4 + 2) + [blank] * 3
    assert p.audio_ids.tolist() == exp_a and p.text_ids.tolist() == exp_t
    assert len(p) == len(text) + 4 + 6
    assert p.continuous_mask.tolist() == [False] * 5 + [True] * 4 + [False] * 4
    assert p.spans[0].start == 5 and p.spans[0].length == 4


def test_speech_conversation_uses_ctd_and_text_question_has_no_marker():
    p = build_prompt([Message("user", "audio", "x")], "both", T, OFFSET, stub_text, lambda c: _sem(2))
    assert p.audio_ids.tolist()[-3:] == [T.speech_ctd, T.msg_end, T.kimia_assistant_msg_start]
    q = build_prompt([Message("user", "text", "hi")], "both", T, OFFSET, stub_text, lambda c: _sem(2))
    assert q.audio_ids.tolist() == [T.kimia_user_msg_start, T.text_blank, T.text_blank, T.msg_end,
                                    T.kimia_assistant_msg_start]
    assert q.stacked_features() is None and q.spans == ()


def test_multiturn_history_with_assistant_audio():
    msgs = [{"role": "user", "message_type": "audio", "content": "u"},
            {"role": "assistant", "message_type": "audio", "content": "a"},
            {"role": "assistant", "message_type": "text", "content": "ok"},
            {"role": "user", "message_type": "audio", "content": "u2"}]
    p = build_prompt(msgs, "text", T, OFFSET, stub_text, lambda c: _sem(3))
    a = p.audio_ids.tolist()
    # assistant run: audio not last in run -> no marker; text ends the run -> msg_end but no ct
    i = a.index(T.kimia_assistant_msg_start)
    assert a[i + 1] == T.media_begin and a[i + 5] == T.media_end
    assert a[i + 6: i + 8] == [T.text_blank, T.text_blank] and a[i + 8] == T.msg_end
    assert a.count(T.speech_ct) == 2 and a.count(T.msg_end) == 3
    assert len(p.features) == 3 and p.continuous_mask.sum() == 9


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="output_type"):
        build_prompt([], "speech", T, OFFSET, stub_text, lambda c: _sem(1))
    with pytest.raises(ValueError, match="role"):
        build_prompt([Message("system", "text", "x")], "text", T, OFFSET, stub_text, lambda c: _sem(1))
    with pytest.raises(ValueError, match="features"):
        build_prompt([Message("user", "audio", "x")], "text", T, OFFSET, stub_text,
                     lambda c: AudioEncoding(np.arange(5), np.zeros((3, 4), np.float32)))
