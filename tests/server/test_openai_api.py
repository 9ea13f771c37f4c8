"""The OpenAI-compatible endpoints, driven by the official ``openai`` client (and httpx where the client hides
what is checked) over real sockets, on the session's tiny bundle. Every chat passes max_tokens: the tiny model's
random weights rarely stop on their own."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai", reason="the test extra is not installed (pip install .[test])")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed (pip install .[test])")

from kimia_edge.runtime.server.auth import key_ok, ws_subprotocol  # noqa: E402
from kimia_edge.runtime.server.config import ServerConfig  # noqa: E402

MODEL = "kimi-audio@Q8_0"
KEY = "test-key-0123456789"
STEPS = 24  # LLM steps per test turn (under 2 s of speech)


def client(url: str, key: str = "unused", **kw: Any) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def clip(shared_audio: Path) -> bytes:
    return (shared_audio / "qa_example.wav").read_bytes()


def audio_part(data: bytes, fmt: str = "wav") -> Dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def spoken(data: bytes, fmt: str = "wav") -> List[Dict[str, Any]]:
    return [{"role": "user", "content": [audio_part(data, fmt)]}]


def metric(url: str, name: str, headers: Dict[str, str] = {}) -> float:
    """One series' value from /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", headers=headers).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_idle(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(url + "/health").json()["queue"]["running"]:
        assert time.monotonic() < deadline, "the turn kept running"
        time.sleep(0.05)


# ---- small endpoints ------------------------------------------------------------------------------------------
def test_health_models_and_metrics(serve) -> None:
    url = serve()
    health = httpx.get(url + "/health").json()
    assert health == {"status": "ok", "models": [MODEL], "queue": {"running": False, "waiting": 0, "max_queue": 4}}
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.object == "list"
    assert client(url).models.retrieve(MODEL).id == MODEL
    page = httpx.get(url + "/metrics")
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "kimia_queue_depth 0" in page.text
    assert 'kimia_http_requests_total{endpoint="/v1/models",method="GET",status="200"} 1' in page.text


# ---- transcriptions -------------------------------------------------------------------------------------------
def test_transcriptions_in_every_format(serve, clip: bytes) -> None:
    url = serve(max_steps=STEPS)
    c = client(url)
    as_json = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip))
    assert isinstance(as_json.text, str) and as_json.text
    assert as_json.usage.type == "tokens" and as_json.usage.output_tokens <= STEPS
    text = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip), response_format="text")
    assert text == as_json.text  # greedy: the same clip gives the same transcript
    verbose = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip), response_format="verbose_json")
    duration = sf.info(io.BytesIO(clip)).duration
    assert verbose.text == as_json.text and verbose.duration == pytest.approx(duration, abs=1e-3)
    [segment] = verbose.segments  # one segment: the whole clip
    assert (segment.start, segment.end, segment.text) == (0.0, pytest.approx(duration, abs=1e-3), as_json.text)
    srt = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip), response_format="srt")
    end = f"{int(duration // 3600):02d}:{int(duration % 3600 // 60):02d}:{int(duration % 60):02d}"
    assert srt.startswith(f"1\n00:00:00,000 --> {end},") and as_json.text in srt
    vtt = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip), response_format="vtt")
    assert vtt.startswith(f"WEBVTT\n\n00:00:00.000 --> {end}.") and as_json.text in vtt


def test_streamed_transcription_gives_deltas_then_the_text(serve, clip: bytes) -> None:
    url = serve(max_steps=STEPS)
    c = client(url)
    whole = c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip)).text
    events = list(c.audio.transcriptions.create(model=MODEL, file=("q.wav", clip), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(deltas) == len(events) - 1 >= 1
    assert "".join(deltas) == events[-1].text == whole
    assert events[-1].usage.output_tokens <= STEPS


# ---- chat completions -----------------------------------------------------------------------------------------
def test_spoken_chat_returns_speech_and_its_transcript(serve, clip: bytes) -> None:
    url = serve()
    c = client(url)
    r = c.chat.completions.create(model=MODEL, modalities=["text", "audio"], audio={"voice": "default", "format": "wav"},
                                  messages=spoken(clip), max_tokens=STEPS, seed=7)
    msg, usage = r.choices[0].message, r.usage
    assert msg.content is None and msg.audio.transcript and r.choices[0].finish_reason in ("stop", "length")
    wav, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="int16")
    info = sf.info(io.BytesIO(base64.b64decode(msg.audio.data)))
    assert rate == 24_000 and info.channels == 1 and info.subtype == "PCM_16" and len(wav) > 0
    assert usage.completion_tokens <= STEPS and usage.prompt_tokens > 0
    extra = usage.model_extra
    assert extra["output_audio_s"] == pytest.approx(len(wav) / 24_000, abs=1 / 24_000)
    assert extra["first_audio_s"] > 0 and extra["synth_rtf"] > 0 and extra["encode_rtf"] > 0
    assert msg.audio.expires_at > r.created
    # a follow-up cites the answer by its audio id (its transcript joins the history): a longer prompt
    follow = c.chat.completions.create(model=MODEL, modalities=["text", "audio"], audio={"voice": "x", "format": "pcm16"},
                                       messages=spoken(clip) + [{"role": "assistant", "audio": {"id": msg.audio.id}}]
                                       + spoken(clip), max_tokens=4, seed=7)
    assert follow.usage.prompt_tokens > 2 * usage.prompt_tokens
    pcm = base64.b64decode(follow.choices[0].message.audio.data)
    assert len(pcm) % 2 == 0 and len(pcm) // 2 == round(follow.usage.model_extra["output_audio_s"] * 24_000)
    spoke = 1 + (follow.usage.model_extra["output_audio_s"] > 0)  # 4 steps may end before the first audio
    assert metric(url, "kimia_first_audio_seconds_count") == spoke
    assert metric(url, 'kimia_turns_total{stop="max_tokens"}') + metric(url, 'kimia_turns_total{stop="audio_eos"}') \
        + metric(url, 'kimia_turns_total{stop="text_eos"}') == 2


def test_streamed_chat_sends_pcm16_chunks_and_the_same_transcript(serve, clip: bytes) -> None:
    url = serve()
    c = client(url)
    kw = dict(model=MODEL, modalities=["text", "audio"], messages=spoken(clip), max_tokens=STEPS, seed=3)
    whole = c.chat.completions.create(audio={"voice": "v", "format": "pcm16"}, **kw)
    chunks = list(c.chat.completions.create(audio={"voice": "v", "format": "pcm16"}, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    audio = [d.audio for d in deltas if d.audio is not None]  # typed by the client: ChoiceDeltaAudio
    transcript = "".join(a.transcript or "" for a in audio)
    pcm = b"".join(base64.b64decode(a.data) for a in audio if a.data)
    assert deltas[0].role == "assistant" and sum(a.data is not None for a in audio) >= 1
    assert transcript == whole.choices[0].message.audio.transcript  # text is greedy: same answer either way
    samples = np.frombuffer(pcm, dtype="<i2")
    assert len(samples) == round(whole.usage.model_extra["output_audio_s"] * 24_000)  # same length, seeded
    assert len({a.id for a in audio}) == 1 and audio[-1].expires_at > chunks[0].created  # the last: expiry only
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_only_answer_is_content(serve, clip: bytes) -> None:
    url = serve()
    c = client(url)
    r = c.chat.completions.create(model="kimi-audio", messages=[{"role": "system", "content": "Be brief."}]
                                  + spoken(clip), max_tokens=STEPS)
    assert r.model == MODEL and isinstance(r.choices[0].message.content, str) and r.choices[0].message.audio is None
    streamed = c.chat.completions.create(model=MODEL, messages=spoken(clip), max_tokens=STEPS, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
        c.chat.completions.create(model=MODEL, messages=spoken(clip), max_tokens=STEPS).choices[0].message.content


# ---- auth -----------------------------------------------------------------------------------------------------
def test_api_key_is_required_when_set(serve, clip: bytes) -> None:
    url = serve(api_key=KEY, max_steps=4)
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "wrong-key-0000000").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(url + "/v1/audio/transcriptions").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # open: load balancers probe it
    # the page and its scripts are open (a browser cannot send a header for them; they hold no secret)
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/static/app.js").status_code == 200
    assert client(url, KEY).audio.transcriptions.create(model=MODEL, file=("q.wav", clip)).text is not None
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_websocket_key_helper() -> None:
    offered = {"sec-websocket-protocol": f"realtime, openai-insecure-api-key.{KEY}"}
    assert key_ok(offered, KEY) and not key_ok(offered, KEY + "x") and key_ok({}, None)
    assert key_ok({"authorization": f"Bearer {KEY}"}, KEY) and not key_ok({}, KEY)
    assert ws_subprotocol(offered) == "realtime"


def test_non_loopback_bind_without_key_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--api-key"):
        ServerConfig(host="0.0.0.0").validate()
    ServerConfig(host="0.0.0.0", api_key=KEY).validate()
    # the bundle does not exist: the refusal comes before anything is opened
    run = subprocess.run([sys.executable, "-m", "kimia_edge.cli", "serve", "--bundle", str(tmp_path / "none"),
                          "--host", "192.0.2.1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: host '192.0.2.1' is not loopback: serving beyond this machine needs --api-key"]


# ---- queue, disconnects -----------------------------------------------------------------------------------------
def _chat_body(clip: bytes, steps: int, **kw: Any) -> Dict[str, Any]:
    return {"model": MODEL, "modalities": ["text", "audio"], "audio": {"voice": "v", "format": "pcm16"},
            "messages": spoken(clip), "max_tokens": steps, "stream": True, **kw}


@pytest.fixture
def streaming_turn(clip: bytes) -> Iterator[Any]:
    """``start(url)`` opens a streamed chat of 1500 steps and returns once its first chunk after the role arrived
    (the turn is running); ``stop()`` drops the connection."""
    opened: List[Any] = []

    def start(url: str) -> Any:
        http = httpx.Client(timeout=120)
        cm = http.stream("POST", url + "/v1/chat/completions", json=_chat_body(clip, 1500))
        response = cm.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data:")
            if seen == 2:
                break
        opened.append((http, cm, lines))  # the line iterator too: collected, it would close the response
        return response

    def stop() -> None:
        while opened:
            http, cm, _ = opened.pop()
            cm.__exit__(None, None, None)
            http.close()

    start.stop = stop  # type: ignore[attr-defined]
    yield start
    stop()


def test_full_queue_answers_429_with_retry_after(serve, clip: bytes, streaming_turn) -> None:
    url = serve(max_queue=0)
    streaming_turn(url)
    with pytest.raises(openai.RateLimitError) as e:
        client(url).chat.completions.create(model=MODEL, messages=spoken(clip), max_tokens=4)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "queue_full"
    streaming_turn.stop()
    wait_idle(url)
    assert client(url).chat.completions.create(model=MODEL, messages=spoken(clip), max_tokens=4).choices


def test_a_client_that_leaves_cancels_its_turn(serve, clip: bytes, streaming_turn) -> None:
    url = serve(max_queue=0)
    streaming_turn(url)
    steps_before = metric(url, "kimia_llm_steps_total")
    streaming_turn.stop()  # the client goes away mid-answer
    wait_idle(url)  # the queue frees itself: the turn was cancelled, not run to its 1500 steps
    assert metric(url, "kimia_turns_cancelled_total") == 1
    assert metric(url, "kimia_llm_steps_total") < 1500
    assert steps_before == 0  # the cancelled turn's steps are counted once it ended
    # the next turn runs at once (max_queue=0: it would be refused if the old one still held the pipeline)
    r = client(url).chat.completions.create(model=MODEL, modalities=["text", "audio"], messages=spoken(clip),
                                            audio={"voice": "v", "format": "wav"}, max_tokens=4)
    assert r.choices[0].message.audio.data


def test_non_streamed_client_that_leaves_cancels_its_turn(serve, clip: bytes) -> None:
    url = serve(max_queue=0)
    body = dict(_chat_body(clip, 1500), stream=False, audio={"voice": "v", "format": "wav"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(120, read=3))
    wait_idle(url)
    assert metric(url, "kimia_turns_cancelled_total") == 1 and metric(url, "kimia_llm_steps_total") < 1500


# ---- bad requests: an OpenAI-shaped error each, and the server goes on serving --------------------------------
def _noise_wav(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * rate)).astype(np.float32), rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _expect(response: "httpx.Response", status: int, code: str, param: Any = ...) -> Dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    if param is not ...:
        assert err["param"] == param
    return err


@pytest.fixture
def bad_request_server(serve) -> str:
    """Turns of 2 steps (each bad request is followed by a good one), uploads up to 600 kB."""
    return serve(max_steps=2, max_upload_bytes=600_000)


def _transcribe(url: str, clip: bytes, **fields: str) -> "httpx.Response":
    return httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", clip)},
                      data={"model": MODEL, **fields}, timeout=120)


def _chat(url: str, body: Any, **kw: Any) -> "httpx.Response":
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120, **kw)


def _ok_body(clip: bytes) -> Dict[str, Any]:
    return {"model": MODEL, "messages": spoken(clip), "max_tokens": 2}


TRANSCRIPTION_CASES = {
    "unknown model": (dict(model="whisper-1"), 404, "model_not_found", "model"),
    "bad response_format": (dict(response_format="xml"), 400, "invalid_value", "response_format"),
    "bad temperature": (dict(temperature="3"), 400, "invalid_value", "temperature"),
    "temperature not a number": (dict(temperature="warm"), 400, "invalid_value", "temperature"),
    "bad stream flag": (dict(stream="maybe"), 400, "invalid_value", "stream"),
}


@pytest.mark.parametrize("case", list(TRANSCRIPTION_CASES))
def test_bad_transcription_fields(bad_request_server: str, clip: bytes, case: str) -> None:
    fields, status, code, param = TRANSCRIPTION_CASES[case]
    _expect(_transcribe(bad_request_server, clip, **fields), status, code, param)
    assert _transcribe(bad_request_server, clip).status_code == 200


def test_bad_transcription_uploads(bad_request_server: str, clip: bytes) -> None:
    url = bad_request_server
    _expect(_transcribe(url, b"RIFF\x00\x00not a wav at all"), 400, "invalid_audio", "file")
    _expect(_transcribe(url, _noise_wav(20, 16_000)), 413, "request_too_large")  # 640 kB > 600 kB
    _expect(httpx.post(url + "/v1/audio/transcriptions", json={"model": MODEL}), 415, "unsupported_media_type")
    _expect(httpx.post(url + "/v1/audio/transcriptions", data={"model": MODEL}), 415, "unsupported_media_type")
    _expect(httpx.post(url + "/v1/audio/transcriptions", files={"x": ("a", b"1")}, data={"model": MODEL}),
            400, "missing_required_parameter", "file")
    _expect(_transcribe(url, _silence_wav()), 400, "invalid_audio", "file")
    assert _transcribe(url, clip).status_code == 200


def _silence_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16_000, np.float32), 16_000, format="WAV")
    return buf.getvalue()


def _chat_cases(clip: bytes) -> Dict[str, Any]:
    ok = _ok_body(clip)
    b64 = base64.b64encode(clip).decode()
    return {
        "unknown model": ({**ok, "model": "gpt-4o-audio-preview"}, 404, "model_not_found", "model"),
        "bad base64": ({**ok, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%not base64%%%", "format": "wav"}}]}]},
            400, "invalid_base64", "messages[0].content[0].input_audio.data"),
        "unsupported format": ({**ok, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": b64, "format": "aac"}}]}]},
            400, "unsupported_format", "messages[0].content[0].input_audio.format"),
        "corrupt audio": ({**ok, "messages": spoken(b"RIFF....WAVEfmt garbage")}, 400, "invalid_audio", "input_audio"),
        "odd pcm16": ({**ok, "messages": spoken(b"\x01\x02\x03", "pcm16")}, 400, "invalid_audio", "input_audio"),
        "temperature too high": ({**ok, "temperature": 5}, 400, "invalid_value", "temperature"),
        "max_tokens zero": ({**ok, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        "max_tokens not a number": ({**ok, "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
        "seed negative": ({**ok, "seed": -1}, 400, "invalid_value", "seed"),
        "bad modalities": ({**ok, "modalities": ["audio"]}, 400, "invalid_value", "modalities"),
        "bad audio format": ({**ok, "modalities": ["text", "audio"], "audio": {"voice": "v", "format": "aac"}},
                             400, "invalid_value", "audio.format"),
        "wav while streaming": ({**ok, "stream": True, "modalities": ["text", "audio"],
                                 "audio": {"voice": "v", "format": "wav"}}, 400, "invalid_value", "audio.format"),
        "n above one": ({**ok, "n": 2}, 400, "invalid_value", "n"),
        "text only": ({**ok, "messages": [{"role": "user", "content": "hello"}]}, 400, "audio_required",
                      "messages[0].content"),
        "bad role": ({**ok, "messages": [{"role": "tool", "content": "x"}] + spoken(clip)}, 400, "invalid_value",
                     "messages[0].role"),
        "unknown audio id": ({**ok, "messages": [{"role": "assistant", "audio": {"id": "audio_nope"}}] + spoken(clip)},
                             400, "invalid_value", "messages[0].audio.id"),
        "no messages": ({**ok, "messages": []}, 400, "missing_required_parameter", "messages"),
        "not an object": ([1, 2], 400, "invalid_json", None),
    }


def test_bad_chat_requests(bad_request_server: str, clip: bytes) -> None:
    url = bad_request_server
    for case, (body, status, code, param) in _chat_cases(clip).items():
        err = _expect(_chat(url, body), status, code, param)
        assert _chat(url, _ok_body(clip)).status_code == 200, f"server down after {case}: {err}"


def test_bad_chat_bodies(bad_request_server: str, clip: bytes) -> None:
    url = bad_request_server
    _expect(_chat(url, None, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json")
    _expect(_chat(url, None, content=b"model=x", headers={"content-type": "application/x-www-form-urlencoded"}),
            415, "unsupported_media_type")
    big = _noise_wav(20, 16_000)  # 640 kB decoded > 600 kB; the body itself is under the body limit
    _expect(_chat(url, {**_ok_body(clip), "messages": spoken(big)}), 413, "request_too_large")
    huge = json.dumps({**_ok_body(clip), "messages": spoken(big * 2)}).encode()  # over the body limit itself
    _expect(_chat(url, None, content=huge, headers={"content-type": "application/json"}), 413, "request_too_large")
    # no Content-Length (chunked): counted as it arrives
    _expect(_chat(url, None, content=iter([huge[:400_000], huge[400_000:]]),
                  headers={"content-type": "application/json"}), 413, "request_too_large")
    _expect(httpx.get(url + "/v1/nothing-here"), 404, "not_found")
    _expect(httpx.get(url + "/v1/models/whisper-1"), 404, "model_not_found", "model")
    assert _chat(url, _ok_body(clip)).status_code == 200


def test_audio_too_long_for_the_context(serve, clip: bytes) -> None:
    url = serve(max_steps=2, max_upload_bytes=4 * 2**20)
    long_clip = _noise_wav(340, 4_000)  # 340 s = 4250 positions > the 4096 of the LLM context; 2.7 MB at 4 kHz
    err = _expect(_chat(url, {**_ok_body(clip), "messages": spoken(long_clip)}), 400, "context_length_exceeded")
    assert "4096" in err["message"]
    _expect(_transcribe(url, long_clip), 400, "context_length_exceeded")
    assert _chat(url, _ok_body(clip)).status_code == 200


def test_an_internal_failure_is_500_and_the_server_goes_on(serve, tiny_bundle: Path, clip: bytes) -> None:
    """A pipeline opened text_only cannot speak: a spoken chat fails inside the turn (no detokenizer), a real
    failure of a component, not a bad request; the next (text) request is answered."""
    from kimia_edge.runtime.pipeline import Pipeline, PipelineOptions

    url = serve(pipeline=Pipeline.from_bundle(tiny_bundle, PipelineOptions(threads=1, prepack=False, text_only=True)))
    body = {**_ok_body(clip), "modalities": ["text", "audio"], "audio": {"voice": "v", "format": "wav"}}
    err = _expect(_chat(url, body), 500, "internal_error")
    assert "text_only" in err["message"] and err["type"] == "server_error"
    assert _chat(url, _ok_body(clip)).json()["choices"][0]["message"]["content"] is not None
    stream = _chat(url, {**body, "stream": True, "audio": {"voice": "v", "format": "pcm16"}})
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert events[-1]["error"]["code"] == "internal_error"  # a stream that already began ends with an error event
    assert metric(url, 'kimia_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="500"}') == 1


def test_serve_without_the_extra_is_one_line(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['fastapi'] = None  # as if not installed\n"
              "from kimia_edge.cli import main; sys.exit(main(['serve', '--bundle', sys.argv[1]]))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: kimia-edge serve needs the serve extra (fastapi missing): pip install kimia-edge[serve]"]
