"""WS /v1/realtime over a real socket on 127.0.0.1 with the websockets client: a spoken conversation with server
VAD, a barge-in, manual commit, the binary transport, auth, and every error event followed by a working one."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

websockets = pytest.importorskip("websockets", reason="the test extra is not installed")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from kimia_edge.runtime.frontend import load_audio, to_16k_mono  # noqa: E402
from kimia_edge.runtime.server.realtime import StreamResampler, float_to_pcm16  # noqa: E402

MAX_TOKENS = 30  # the tiny random model rarely stops by itself: each response is capped (one step = 80 ms)
SPEECH = "qa_example.wav"


@pytest.fixture(scope="module")
def speech(shared_audio: Path) -> np.ndarray:
    """A real spoken question, float32 mono at 16 kHz."""
    x, rate = load_audio(shared_audio / SPEECH)
    return to_16k_mono(x, rate)


def at_rate(x16: np.ndarray, rate: int) -> np.ndarray:
    if rate == 16_000:
        return x16
    from scipy.signal import resample_poly

    return resample_poly(x16, rate // 8000, 2).astype(np.float32)


def chunks(x: np.ndarray, rate: int, seconds: float = 0.1) -> List[bytes]:
    n = int(rate * seconds)
    return [float_to_pcm16(x[i:i + n]) for i in range(0, len(x), n)]


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/realtime"


class Client:
    """A socket and every event received, with timestamps (time.perf_counter)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: List[Tuple[float, Any]] = []

    async def send(self, type_: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type_, **fields}))

    async def append(self, pcm: bytes) -> None:
        await self.send("input_audio_buffer.append", audio=base64.b64encode(pcm).decode())

    async def recv(self, timeout: float = 120) -> Any:
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        event = msg if isinstance(msg, bytes) else json.loads(msg)
        self.seen.append((time.perf_counter(), event))
        return event

    async def until(self, type_: str, timeout: float = 120) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(event, dict) and event["type"] == type_:
                return event

    def types(self) -> List[str]:
        return [e["type"] if isinstance(e, dict) else "<binary>" for _, e in self.seen]

    def of(self, type_: str) -> List[Dict[str, Any]]:
        return [e for _, e in self.seen if isinstance(e, dict) and e["type"] == type_]


async def open_client(base: str, **kwargs: Any) -> Client:
    ws = await connect(ws_url(base), max_size=None, **kwargs)
    c = Client(ws)
    assert (await c.recv())["type"] == "session.created"
    return c


async def configure(c: Client, **session: Any) -> Dict[str, Any]:
    await c.send("session.update", session={"max_response_output_tokens": MAX_TOKENS, **session})
    return await c.until("session.updated")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_stream_resampler_matches_whole_clip_resampling(speech: np.ndarray) -> None:
    x24 = at_rate(speech, 24_000)
    r = StreamResampler(24_000)
    sizes = [1, 479, 960, 2400, 7, 4800]
    parts, i, k = [], 0, 0
    while i < len(x24):
        parts.append(r.push(x24[i:i + sizes[k % len(sizes)]]))
        i, k = i + sizes[k % len(sizes)], k + 1
    parts.append(r.flush())
    np.testing.assert_allclose(np.concatenate(parts), to_16k_mono(x24, 24_000), atol=1e-5)


def test_conversation_with_server_vad(serve, speech: np.ndarray) -> None:
    base = serve()

    async def go() -> None:
        c = await open_client(base)
        session = (await configure(c))["session"]
        assert session["turn_detection"]["type"] == "server_vad" and session["input_audio_sample_rate"] == 24_000
        x = np.concatenate([at_rate(speech, 24_000), np.zeros(24_000, np.float32)])  # 1 s of silence after it
        for pcm in chunks(x, 24_000):
            await c.append(pcm)
        done = await c.until("response.done")
        types = c.types()
        order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "response.audio.delta",
                 "response.audio.done", "response.audio_transcript.done", "response.done"]
        assert [types.index(t) for t in order] == sorted(types.index(t) for t in order), types
        assert "response.audio_transcript.delta" in types
        started = c.of("input_audio_buffer.speech_started")[0]["audio_start_ms"]
        stopped = c.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"]
        assert 0 <= started < stopped <= len(x) * 1000 / 24_000
        r = done["response"]
        assert r["status"] == "completed" and r["metrics"]["llm_steps"] == MAX_TOKENS
        assert r["metrics"]["first_audio_s"] > 0 and r["usage"]["output_tokens"] == MAX_TOKENS
        pcm = b"".join(base64.b64decode(e["delta"]) for e in c.of("response.audio.delta"))
        assert len(pcm) // 2 == round(r["metrics"]["output_audio_s"] * 24_000) > 0
        transcript = "".join(e["delta"] for e in c.of("response.audio_transcript.delta"))
        assert c.of("response.audio_transcript.done")[0]["transcript"] == transcript
        await c.send("conversation.item.retrieve", item_id=r["output"][0]["id"])
        item = (await c.until("conversation.item.retrieved"))["item"]
        assert item["role"] == "assistant" and item["content"][0]["transcript"] == transcript
        await c.ws.close()

    run(go())


def test_barge_in_cancels_and_keeps_only_what_was_played(serve, speech: np.ndarray) -> None:
    """Speech during the answer's audio cancels it; the client reports what it played (conversation.item.truncate,
    as OpenAI clients do on interruption) and the history keeps only that part of the answer."""
    base = serve()

    async def go() -> None:
        c = await open_client(base)
        await configure(c, max_response_output_tokens=80, input_audio_sample_rate=16_000)
        silence = np.zeros(16_000, np.float32)
        for pcm in chunks(np.concatenate([speech, silence]), 16_000):
            await c.append(pcm)
        first = await c.until("response.audio.delta")
        resp1, item1 = first["response_id"], first["item_id"]
        # the user speaks again while the answer streams: enough speech for the VAD to start...
        head, rest = chunks(speech, 16_000)[:20], chunks(np.concatenate([speech, silence]), 16_000)[20:]  # speech from 1.2 s
        for pcm in head:
            await c.append(pcm)
        t_started = (await c.until("input_audio_buffer.speech_started"))
        t0 = c.seen[-1][0]
        # ...the client stops playing and reports what it played: 40 % of what it had received
        received = sum(len(base64.b64decode(e["delta"])) // 2 for _, e in c.seen
                       if isinstance(e, dict) and e["type"] == "response.audio.delta")
        played_ms = int(received * 0.4 * 1000 / 24_000)
        await c.send("conversation.item.truncate", item_id=item1, content_index=0, audio_end_ms=played_ms)
        done = await c.until("response.done", timeout=30)
        t_done = c.seen[-1][0]
        assert done["response"]["id"] == resp1 and done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        deltas = [t for t, e in c.seen if isinstance(e, dict) and e["type"] == "response.audio.delta"
                  and e["response_id"] == resp1]
        assert t_done - t0 < 5.0, f"barge-in took {t_done - t0:.2f} s"  # measured values: docs/server.md
        assert max(deltas) <= t_done
        truncated = await c.until("conversation.item.truncated")
        assert truncated["item_id"] == item1 and truncated["audio_end_ms"] == played_ms
        print(f"\nbarge-in: speech_started -> last delta {max(0, max(deltas) - t0):.3f} s, -> response.done "
              f"{t_done - t0:.3f} s (server: {done['response']['metrics']})")
        assert t_started["audio_start_ms"] > 0
        for pcm in rest:  # the second utterance ends: its response starts after the cut history
            await c.append(pcm)
        second = await c.until("response.done")
        assert second["response"]["id"] != resp1 and second["response"]["status"] == "completed"
        full = c.of("response.audio_transcript.done")[0]["transcript"]
        await c.send("conversation.item.retrieve", item_id=item1)
        kept = (await c.until("conversation.item.retrieved"))["item"]["content"][0]["transcript"]
        assert full.startswith(kept) and (len(kept) < len(full) or not full), (kept, full)
        await c.ws.close()

    run(go())


def test_manual_commit_create_and_cancel(serve, speech: np.ndarray) -> None:
    base = serve()

    async def go() -> None:
        c = await open_client(base)
        await configure(c, turn_detection=None, input_audio_sample_rate=16_000)
        for pcm in chunks(np.concatenate([speech, np.zeros(16_000, np.float32)]), 16_000):
            await c.append(pcm)
        await c.send("response.create")
        assert (await c.until("error"))["error"]["code"] == "no_committed_audio"
        await c.send("input_audio_buffer.commit")
        committed = await c.until("input_audio_buffer.committed")
        await c.send("response.create")
        await c.until("response.created")
        await c.send("response.create")  # one response at a time
        assert (await c.until("error"))["error"]["code"] == "conversation_already_has_active_response"
        done = await c.until("response.done")
        assert done["response"]["status"] == "completed"
        assert "input_audio_buffer.speech_started" not in c.types()
        await c.send("conversation.item.retrieve", item_id=committed["item_id"])
        user = (await c.until("conversation.item.retrieved"))["item"]
        assert user["role"] == "user" and abs(user["content"][0]["audio_s"] - (len(speech) / 16_000 + 1)) < 0.01
        # a second turn, cancelled by the client (the page's Stop button)
        for pcm in chunks(speech, 16_000):
            await c.append(pcm)
        await c.send("input_audio_buffer.commit")
        await c.send("response.create", response={"max_output_tokens": 400})
        await c.until("response.created")
        t0 = time.perf_counter()
        await c.send("response.cancel")
        done = await c.until("response.done", timeout=30)
        assert done["response"]["status"] == "cancelled" and time.perf_counter() - t0 < 5.0
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        await c.ws.close()

    run(go())


def test_binary_transport(serve, speech: np.ndarray) -> None:
    base = serve()

    async def go() -> None:
        c = await open_client(base)
        session = (await configure(c, turn_detection=None, output_audio_transport="binary"))["session"]
        assert session["output_audio_transport"] == "binary"
        for pcm in chunks(at_rate(speech, 24_000), 24_000):
            await c.ws.send(pcm)  # a binary frame is raw pcm16 input
        await c.send("input_audio_buffer.commit")
        await c.until("input_audio_buffer.committed")
        await c.send("response.create")
        done = await c.until("response.done")
        types = c.types()
        frames = [e for _, e in c.seen if isinstance(e, bytes)]
        assert frames and "response.audio.delta" not in types
        first, last = types.index("<binary>"), len(types) - 1 - types[::-1].index("<binary>")
        assert types.index("response.created") < first and last < types.index("response.done")
        assert sum(len(f) for f in frames) // 2 == round(done["response"]["metrics"]["output_audio_s"] * 24_000)
        await c.ws.close()

    run(go())


def test_auth(serve) -> None:
    key = "sk-local-test-key"
    base = serve(api_key=key)

    async def go() -> None:
        async with connect(ws_url(base)) as ws:  # no key: an error event, then closed with 1008
            event = json.loads(await ws.recv())
            assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        for kwargs in ({"additional_headers": {"Authorization": "Bearer wrong-key-123"}},
                       {"subprotocols": ["realtime", "openai-insecure-api-key.wrong-key-123"]}):
            async with connect(ws_url(base), **kwargs) as ws:
                assert json.loads(await ws.recv())["error"]["code"] == "invalid_api_key"
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
        c = await open_client(base, additional_headers={"Authorization": f"Bearer {key}"})
        await c.ws.close()
        c = await open_client(base, subprotocols=["realtime", f"openai-insecure-api-key.{key}"])
        assert c.ws.subprotocol == "realtime"  # the key is never echoed back
        await c.ws.close()

    run(go())


BAD_EVENTS = [
    ("{not json", "invalid_json"),
    ('["a list"]', "invalid_event"),
    ({"type": "no.such.event"}, "unknown_event"),
    ({"type": "input_audio_buffer.append", "audio": "!!not base64!!"}, "invalid_base64"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()}, "invalid_value"),
    ({"type": "input_audio_buffer.append"}, "invalid_type"),
    ({"type": "session.update", "session": {"turn_detection": {"type": "server_vad", "threshold": 2}}},
     "invalid_value"),
    ({"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}, "invalid_value"),
    ({"type": "session.update", "session": {"no_such_field": 1}}, "unknown_parameter"),
    ({"type": "session.update", "session": {"input_audio_sample_rate": 44_100}}, "invalid_value"),
    ({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}, "invalid_value"),
    ({"type": "session.update", "session": {"max_response_output_tokens": 0}}, "invalid_value"),
    ({"type": "session.update", "session": {"output_audio_transport": "carrier-pigeon"}}, "invalid_value"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
    ({"type": "response.cancel"}, "response_cancel_not_active"),
    ({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": -1},
     "invalid_value"),
    ({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 10},
     "item_truncate_invalid_item_id"),
    ({"type": "conversation.item.retrieve", "item_id": "item_x"}, "item_not_found"),
]


def test_error_events_leave_the_socket_working(serve) -> None:
    base = serve()

    async def go() -> None:
        c = await open_client(base)
        for n, (bad, code) in enumerate(BAD_EVENTS):
            if isinstance(bad, dict):
                bad = json.dumps({**bad, "event_id": f"evt_{n}"})
            await c.ws.send(bad)
            error = (await c.recv())
            assert error["type"] == "error" and error["error"]["code"] == code, (bad, error)
            assert error["error"]["message"]
            if '"event_id"' in bad:
                assert error["error"]["event_id"] == f"evt_{n}"
            await c.send("session.update", session={"turn_detection": None})  # a working event, same socket
            assert (await c.recv())["type"] == "session.updated"
        await c.ws.close()

    run(go())
