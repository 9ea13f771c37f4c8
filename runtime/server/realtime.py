"""WS /v1/realtime: live speech in, text + speech out, server VAD and barge-in (OpenAI Realtime event names).

One conversation per socket, over the shared pipeline; every response is a turn through the shared ``TurnQueue``.
Two tasks per socket: the receive loop (client events, VAD) and the running response, so a barge-in or a
``response.cancel`` is read and acted on while a response streams.

Client events: ``session.update``, ``input_audio_buffer.append`` / ``.commit`` / ``.clear``, ``response.create``,
``response.cancel``, ``conversation.item.truncate``, ``conversation.item.retrieve``. Binary frames are raw pcm16
input audio (the same as an append, without base64). Server events: ``session.created`` / ``.updated``,
``input_audio_buffer.speech_started`` / ``.speech_stopped`` / ``.committed`` / ``.cleared``,
``conversation.item.created``, ``response.created``, ``response.audio.delta`` (or a binary frame),
``response.audio_transcript.delta``, ``response.audio.done``, ``response.audio_transcript.done``,
``response.done``, ``conversation.item.truncated``, ``conversation.item.retrieved``, ``error`` (the socket stays
open after an error event).

Extensions to OpenAI's session (named so that they cannot clash): ``input_audio_sample_rate`` (16000 or 24000,
default 24000 as OpenAI's pcm16), ``output_audio_transport`` ("json" default, or "binary": audio deltas go out as
binary frames of raw pcm16 at 24 kHz between ``response.created`` and ``response.done``; text events stay JSON).
``max_response_output_tokens`` (OpenAI's name) caps the LLM steps of a response (one step = 80 ms of speech).
``response.done``'s response carries ``metrics``: the turn's RunMetrics figures plus, for a cancelled response,
``cancel_to_last_delta_s`` / ``cancel_to_done_s`` (server clock, from the cancel request).

Barge-in and the played-audio rule. With ``turn_detection.type == "server_vad"`` (the default), speech_started
while a response is running cancels it (unless ``interrupt_response`` is false): no audio delta is sent after the
cancel, ``response.done`` follows with status "cancelled" once the turn's worker has stopped. The server cannot
hear what the client played, so the history keeps only the assistant text of the audio the client reports as
played: ``conversation.item.truncate {item_id, audio_end_ms}`` (OpenAI clients send it on interruption) for the
last assistant item; without it, the audio sent before the cancel counts as played. The truncation is applied
once, when the next response starts (or on ``conversation.item.retrieve``), so a truncate that arrives just after
the barge-in still counts. A completed response whose audio the client is still playing is not cancelled (it has
ended); the client's truncate cuts it all the same.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from fractions import Fraction
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from kimia_edge.runtime.frontend import MAX_RESAMPLE_FACTOR, check_sample_rate
from kimia_edge.runtime.pipeline import INPUT_SAMPLE_RATE_HZ, Conversation
from kimia_edge.runtime.streaming import AudioEvent, TextEvent
from kimia_edge.runtime.tasks import generation_config
from kimia_edge.runtime.vad import VadConfig, open_vad
from kimia_edge.runtime.server.auth import key_ok, ws_subprotocol
from kimia_edge.runtime.server.turns import QueueFull

log = logging.getLogger(__name__)
router = APIRouter()

OUTPUT_RATE_HZ = 24_000  # OpenAI's pcm16
INPUT_RATES_HZ = (16_000, 24_000)
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms
MAX_OUTPUT_TOKENS = 4096  # OpenAI's upper bound for max_response_output_tokens
KEY_SUBPROTOCOL = "openai-insecure-api-key."

# session fields of OpenAI's API this server accepts and ignores (no effect on the model)
_IGNORED_SESSION_FIELDS = ("model", "modalities", "instructions", "voice", "tools", "tool_choice", "temperature",
                           "input_audio_transcription", "input_audio_noise_reduction", "speed", "tracing")
_VAD_FIELDS = ("type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
               "interrupt_response")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ClientError(Exception):
    """A client event that cannot be acted on: answered with an ``error`` event, the socket stays open."""

    def __init__(self, code: str, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def _truncate_last(conversation: Conversation, played_samples: int) -> str:
    """Cuts the last assistant message of the history to what was played (the runtime's text/audio alignment);
    returns the text kept ("" when the last turn had no speech to cut)."""
    try:
        return conversation.truncate_last(played_samples)
    except ValueError:  # no turn yet, or a text-only one
        return ""


class StreamResampler:
    """Chunked input at ``rate_hz`` -> 16 kHz, the same samples as ``to_16k_mono`` on the whole signal (polyphase,
    with the filter's context carried between chunks; the last ``hold`` input samples wait for the next chunk or
    ``flush()``)."""

    def __init__(self, rate_hz: int) -> None:
        check_sample_rate(rate_hz)
        r = Fraction(INPUT_SAMPLE_RATE_HZ, int(rate_hz)).limit_denominator(MAX_RESAMPLE_FACTOR)
        self.up, self.down = r.numerator, r.denominator
        half = 10 * max(self.up, self.down) // self.up + 2  # resample_poly's filter half-length, in input samples
        self.hold = self.down * -(-half // self.down)
        self._buf = np.zeros(0, np.float64)
        self._ctx = 0  # samples at the start of _buf already emitted (left context)

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(x, np.float32)
        self._buf = np.concatenate([self._buf, np.asarray(x, np.float64)])
        ready = (len(self._buf) - self.hold - self._ctx) // self.down * self.down
        if ready <= 0:
            return np.zeros(0, np.float32)
        return self._emit(self._ctx + ready, self._buf[: self._ctx + ready + self.hold])

    def flush(self) -> np.ndarray:
        if self.up == self.down or len(self._buf) <= self._ctx:
            self._buf, self._ctx = np.zeros(0), 0
            return np.zeros(0, np.float32)
        end = len(self._buf)
        out = self._emit(end, self._buf)
        self._buf, self._ctx = np.zeros(0), 0
        return out

    def _emit(self, end: int, x: np.ndarray) -> np.ndarray:
        from scipy.signal import resample_poly

        y = resample_poly(x, self.up, self.down)
        first, last = self._ctx * self.up // self.down, -(-end * self.up // self.down)
        keep = min(self.hold, end)
        self._buf, self._ctx = self._buf[end - keep:], keep
        return y[first:last].astype(np.float32)


def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ClientError("invalid_value", f"pcm16 audio must hold whole 16-bit samples; got {len(data)} bytes",
                          "audio")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


# ---- session ------------------------------------------------------------------------------------------------------
@dataclass
class SessionSettings:
    """What ``session.update`` sets. ``vad`` None: manual commit."""

    vad: Optional[Dict[str, Any]] = field(default_factory=lambda: {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 600,
        "create_response": True, "interrupt_response": True})
    input_rate: int = 24_000
    output_binary: bool = False
    max_output_tokens: Optional[int] = None  # None: "inf" (the model's own budget)

    def to_openai(self, session_id: str, model: str) -> Dict[str, Any]:
        return {"id": session_id, "object": "realtime.session", "model": model, "modalities": ["text", "audio"],
                "turn_detection": self.vad, "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_sample_rate": self.input_rate, "output_audio_sample_rate": OUTPUT_RATE_HZ,
                "output_audio_transport": "binary" if self.output_binary else "json",
                "max_response_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens}

    def updated(self, s: Dict[str, Any]) -> "SessionSettings":
        """A copy with the fields of ``s`` (OpenAI's session object); ClientError names a bad one."""
        if not isinstance(s, dict):
            raise ClientError("invalid_type", "session must be an object", "session")
        new = replace(self)
        for key, value in s.items():
            if key == "turn_detection":
                new.vad = _vad_settings(value, self.vad)
            elif key in ("input_audio_format", "output_audio_format"):
                if value != "pcm16":
                    raise ClientError("invalid_value", f"{key}: only 'pcm16' is supported, got {value!r}",
                                      f"session.{key}")
            elif key == "input_audio_sample_rate":
                if value not in INPUT_RATES_HZ:
                    raise ClientError("invalid_value", f"input_audio_sample_rate: expected one of {INPUT_RATES_HZ},"
                                      f" got {value!r}", "session.input_audio_sample_rate")
                new.input_rate = int(value)
            elif key == "output_audio_transport":
                if value not in ("json", "binary"):
                    raise ClientError("invalid_value", f"output_audio_transport: expected 'json' or 'binary', got "
                                      f"{value!r}", "session.output_audio_transport")
                new.output_binary = value == "binary"
            elif key == "max_response_output_tokens":
                new.max_output_tokens = _max_tokens(value, "session.max_response_output_tokens")
            elif key not in _IGNORED_SESSION_FIELDS:
                raise ClientError("unknown_parameter", f"Unknown parameter: 'session.{key}'", f"session.{key}")
        return new


def _max_tokens(value: Any, param: str) -> Optional[int]:
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise ClientError("invalid_value", f"{param.rsplit('.', 1)[-1]}: expected 1..{MAX_OUTPUT_TOKENS} or 'inf', "
                          f"got {value!r}", param)
    return value


def _vad_settings(value: Any, current: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    p = "session.turn_detection"
    if not isinstance(value, dict):
        raise ClientError("invalid_type", "turn_detection must be an object or null", p)
    unknown = sorted(set(value) - set(_VAD_FIELDS))
    if unknown:
        raise ClientError("unknown_parameter", f"Unknown parameter: '{p}.{unknown[0]}'", f"{p}.{unknown[0]}")
    if value.get("type", "server_vad") != "server_vad":
        raise ClientError("invalid_value", f"turn_detection.type: only 'server_vad' is supported, got "
                          f"{value.get('type')!r}", f"{p}.type")
    out = dict(current or SessionSettings().vad, **value)
    checks = {"threshold": (0.0, 1.0), "prefix_padding_ms": (0, 5000), "silence_duration_ms": (30, 10_000)}
    for k, (lo, hi) in checks.items():
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ClientError("invalid_value", f"turn_detection.{k}: expected {lo}..{hi}, got {v!r}", f"{p}.{k}")
    for k in ("create_response", "interrupt_response"):
        if not isinstance(out[k], bool):
            raise ClientError("invalid_type", f"turn_detection.{k}: expected a boolean, got {out[k]!r}", f"{p}.{k}")
    return out


@dataclass
class _Response:
    id: str
    item_id: str
    task: Optional["asyncio.Task[None]"] = None
    sent_samples: int = 0  # at OUTPUT_RATE_HZ
    transcript: List[str] = field(default_factory=list)
    cancel_reason: Optional[str] = None
    cancel_at: Optional[float] = None
    last_delta_at: Optional[float] = None
    done: bool = False
    truncated: bool = False  # its history message was cut (once: the cut is not re-applied on the cut text)


class _Session:
    def __init__(self, websocket: WebSocket, state: Any) -> None:
        self.ws, self.state = websocket, state
        self.id = _id("sess")
        self.settings = SessionSettings()
        self.conversation = state.pipeline.conversation()
        self.item_ids: List[str] = []  # parallel to conversation.history (user, assistant, user, ...)
        self.resampler = StreamResampler(self.settings.input_rate)
        self.buffer: List[np.ndarray] = []  # 16 kHz input since the last commit / clear
        self.buffer_samples = 0
        self.max_buffer_samples = state.config.max_upload_bytes // 2
        self.heard = 0  # 16 kHz samples appended in this session
        self.vad_origin = 0  # ``heard`` when the VAD was (re)started: its sample positions count from there
        self.vad = self._open_vad()
        self.committed: Optional[tuple] = None  # (item_id, clip 16 kHz) waiting for its response
        self.response: Optional[_Response] = None  # the latest response (running or done)
        self.pending_truncate: Optional[tuple] = None  # (item_id, played samples, sent samples)
        self._send_lock = asyncio.Lock()
        self.closed = False

    def _open_vad(self) -> Any:
        v = self.settings.vad
        self.vad_origin = self.heard
        if v is None:
            return None
        return open_vad(self.state.bundle_dir, VadConfig(
            threshold=float(v["threshold"]), pre_roll_s=v["prefix_padding_ms"] / 1000,
            min_silence_s=v["silence_duration_ms"] / 1000))

    # ---- sending ----
    async def send(self, type_: str, **fields: Any) -> None:
        await self.send_json({"type": type_, "event_id": _id("event"), **fields})

    async def send_json(self, event: Dict[str, Any]) -> None:
        if self.closed:
            return
        async with self._send_lock:
            await self.ws.send_text(json.dumps(event))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def error(self, code: str, message: str, param: Optional[str] = None, event_id: Optional[str] = None,
                    type_: str = "invalid_request_error") -> None:
        await self.send("error", error={"type": type_, "code": code, "message": message, "param": param,
                                        "event_id": event_id})

    # ---- receive loop ----
    async def run(self) -> None:
        await self.send("session.created", session=self.settings.to_openai(self.id, self.state.config.model_name))
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                event_id = None
                try:
                    if msg.get("bytes") is not None:
                        await self.append(pcm16_to_float(msg["bytes"]))
                        continue
                    try:
                        event = json.loads(msg.get("text") or "")
                    except ValueError as e:
                        raise ClientError("invalid_json", f"the event is not JSON: {e}") from None
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        raise ClientError("invalid_event", "an event is a JSON object with a string 'type'", "type")
                    event_id = event.get("event_id")
                    await self.dispatch(event)
                except ClientError as e:
                    await self.error(e.code, str(e), e.param, event_id)
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            r = self.response
            if r is not None and r.task is not None and not r.task.done():
                r.task.cancel()
                await asyncio.wait({r.task})

    async def dispatch(self, e: Dict[str, Any]) -> None:
        kind = e["type"]
        if kind == "session.update":
            await self.session_update(e.get("session", {}))
        elif kind == "input_audio_buffer.append":
            audio = e.get("audio")
            if not isinstance(audio, str):
                raise ClientError("invalid_type", "audio: expected a base64 string", "audio")
            try:
                data = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ClientError("invalid_base64", f"audio is not valid base64: {exc}", "audio") from None
            await self.append(pcm16_to_float(data))
        elif kind == "input_audio_buffer.commit":
            await self.commit_buffer(manual=True)
        elif kind == "input_audio_buffer.clear":
            self.clear_buffer()
            self.reset_vad()
            await self.send("input_audio_buffer.cleared")
        elif kind == "response.create":
            await self.response_create(e.get("response") or {})
        elif kind == "response.cancel":
            r = self.response
            if r is None or r.done:
                raise ClientError("response_cancel_not_active", "there is no active response to cancel")
            await self.cancel_response("client_cancelled")
        elif kind == "conversation.item.truncate":
            await self.truncate(e)
        elif kind == "conversation.item.retrieve":
            await self.retrieve(e.get("item_id"))
        else:
            raise ClientError("unknown_event", f"unknown event type {kind!r}", "type")

    async def session_update(self, s: Any) -> None:
        new = self.settings.updated(s)
        if new.input_rate != self.settings.input_rate:
            self.resampler = StreamResampler(new.input_rate)
        vad_changed = new.vad != self.settings.vad
        self.settings = new
        if vad_changed:
            self.vad = self._open_vad()
        await self.send("session.updated", session=new.to_openai(self.id, self.state.config.model_name))

    # ---- input audio ----
    async def append(self, samples: np.ndarray) -> None:
        x = self.resampler.push(samples)
        if self.buffer_samples + len(x) > self.max_buffer_samples:
            if self.vad is None:
                raise ClientError("input_audio_buffer_full", f"the input buffer holds at most "
                                  f"{self.max_buffer_samples / INPUT_SAMPLE_RATE_HZ:.0f} s; commit or clear it")
            self.clear_buffer()  # server VAD: the buffer only serves a manual commit; keep it bounded
        self.buffer.append(x)
        self.buffer_samples += len(x)
        self.heard += len(x)
        if self.vad is None or not len(x):
            return
        for ev in self.vad.push(x):
            ms = int((self.vad_origin + ev.sample) * 1000 // INPUT_SAMPLE_RATE_HZ)
            if ev.kind == "speech_started":
                await self.send("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=None)
                r = self.response
                if self.settings.vad["interrupt_response"] and r is not None and not r.done:
                    await self.cancel_response("turn_detected")
            elif ev.kind == "speech_stopped":
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=ms)
                self.clear_buffer()
                await self.commit(self.vad.utterance())
                if self.settings.vad["create_response"]:
                    await self.start_response()

    def reset_vad(self) -> None:
        if self.vad is not None:
            self.vad.reset()
            self.vad_origin = self.heard

    def clear_buffer(self) -> None:
        self.buffer, self.buffer_samples = [], 0

    async def commit_buffer(self, manual: bool) -> None:
        tail = self.resampler.flush()
        clip = np.concatenate(self.buffer + [tail]) if self.buffer else tail
        if len(clip) < MIN_COMMIT_S * INPUT_SAMPLE_RATE_HZ:
            raise ClientError("input_audio_buffer_commit_empty", f"buffer too small: expected at least "
                              f"{MIN_COMMIT_S * 1000:.0f} ms of audio, have {len(clip) / 16:.0f} ms")
        self.clear_buffer()
        self.reset_vad()
        await self.commit(clip)

    async def commit(self, clip: np.ndarray) -> None:
        item_id = _id("item")
        previous = self.item_ids[-1] if self.item_ids else None
        self.committed = (item_id, clip)
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        await self.send("conversation.item.created", previous_item_id=previous, item={
            "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None,
                         "audio_s": round(len(clip) / INPUT_SAMPLE_RATE_HZ, 3)}]})

    # ---- responses ----
    async def response_create(self, params: Dict[str, Any]) -> None:
        if not isinstance(params, dict):
            raise ClientError("invalid_type", "response must be an object", "response")
        max_tokens = self.settings.max_output_tokens
        if "max_output_tokens" in params:
            max_tokens = _max_tokens(params["max_output_tokens"], "response.max_output_tokens")
        r = self.response
        if r is not None and not r.done:
            raise ClientError("conversation_already_has_active_response",
                              f"response {r.id} is still running; cancel it first")
        if self.committed is None:
            raise ClientError("no_committed_audio", "commit input audio first: every response answers a user "
                              "audio item (input_audio_buffer.commit)")
        await self.start_response(max_tokens)

    async def start_response(self, max_tokens: Any = "session") -> None:
        if self.committed is None:
            return
        if max_tokens == "session":
            max_tokens = self.settings.max_output_tokens
        user_item, clip = self.committed
        self.committed = None
        previous = self.response
        r = _Response(_id("resp"), _id("item"))
        self.response = r
        r.task = asyncio.create_task(self._respond(r, user_item, clip, max_tokens, previous))

    async def cancel_response(self, reason: str) -> None:
        r = self.response
        if r is None or r.done or r.cancel_reason is not None:
            return
        r.cancel_reason, r.cancel_at = reason, time.perf_counter()
        assert r.task is not None
        r.task.cancel()

    async def _respond(self, r: _Response, user_item: str, clip: np.ndarray, max_tokens: Optional[int],
                       previous: Optional[_Response]) -> None:
        status, details, metrics = "completed", None, {}
        try:
            if previous is not None and previous.task is not None:
                await asyncio.wait({previous.task})  # its turn is in the history before this one starts
            self.apply_truncation()
            ticket = self.state.queue.admit()
        except QueueFull as e:
            await self.error("rate_limit_exceeded", str(e), type_="server_error")
            r.done = True
            return
        except asyncio.CancelledError:
            r.done = True
            await self._send_done(r, "cancelled", {"type": "cancelled", "reason": r.cancel_reason}, {})
            return
        await self.send("response.created", response=self._response_obj(r, "in_progress"))
        before = self.conversation.history[-1] if self.conversation.history else None
        config = generation_config("chat", step_limit=max_tokens)
        try:
            async with aclosing(ticket.events(self.conversation, clip, INPUT_SAMPLE_RATE_HZ, "chat",
                                              config=config)) as events:
                async for ev in events:
                    if isinstance(ev, AudioEvent):
                        await self._send_audio(r, ev.samples)
                    elif isinstance(ev, TextEvent):
                        r.transcript.append(ev.text)
                        await self.send("response.audio_transcript.delta", response_id=r.id, item_id=r.item_id,
                                        output_index=0, content_index=0, delta=ev.text)
                    else:  # runtime events beyond text and audio (e.g. the history being trimmed)
                        await self._forward(r, ev)
        except asyncio.CancelledError:  # a barge-in / response.cancel / the socket closing: the turn has stopped
            status, details = "cancelled", {"type": "cancelled", "reason": r.cancel_reason or "client_cancelled"}
        except Exception as e:  # the turn failed (silent audio, a prompt the context cannot hold, ...)
            log.warning("realtime turn failed: %s", e)
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": "turn_failed",
                                                                    "message": str(e)}}
            await self.error("turn_failed", str(e), type_="server_error")
        finally:
            ticket.release()
        self._record_items(before, user_item, r)
        if status == "cancelled" and r.item_id in self.item_ids:
            self.pending_truncate = (r.item_id, r.sent_samples, r.sent_samples)
        last = self.conversation.last
        if last is not None and last.metrics is not None and status != "failed":
            m = last.metrics
            metrics = {"first_audio_s": m.first_audio_s, "first_text_s": m.first_text_s, "encode_s": m.encode_s,
                       "llm_steps": m.llm_steps, "llm_steps_per_s": round(m.llm_steps_per_s, 2),
                       "output_audio_s": m.output_audio_s, "synth_rtf": m.synth_rtf, "encode_rtf": m.encode_rtf,
                       "input_audio_s": m.input_audio_s, "stop": m.stop}
        metrics["sent_audio_s"] = r.sent_samples / OUTPUT_RATE_HZ
        if r.cancel_at is not None:
            metrics["cancel_to_last_delta_s"] = max(0.0, (r.last_delta_at or r.cancel_at) - r.cancel_at)
            metrics["cancel_to_done_s"] = time.perf_counter() - r.cancel_at
        await self._send_done(r, status, details, metrics)

    async def _send_done(self, r: _Response, status: str, details: Any, metrics: Dict[str, Any]) -> None:
        r.done = True
        transcript = "".join(r.transcript)
        if status != "failed" and r.task is not None:
            await self.send("response.audio.done", response_id=r.id, item_id=r.item_id, output_index=0,
                            content_index=0)
            await self.send("response.audio_transcript.done", response_id=r.id, item_id=r.item_id, output_index=0,
                            content_index=0, transcript=transcript)
        resp = self._response_obj(r, status, details)
        last = self.conversation.last
        steps = last.metrics.llm_steps if last is not None and last.metrics is not None else 0
        resp["usage"] = {"total_tokens": steps, "input_tokens": 0, "output_tokens": steps}
        resp["metrics"] = metrics
        await self.send("response.done", response=resp)

    def _response_obj(self, r: _Response, status: str, details: Any = None) -> Dict[str, Any]:
        output = [] if status == "in_progress" else [{
            "id": r.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "completed" if status == "completed" else "incomplete",
            "content": [{"type": "audio", "transcript": "".join(r.transcript)}]}]
        return {"id": r.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output}

    async def _send_audio(self, r: _Response, samples: np.ndarray) -> None:
        if self.state.pipeline.c.output_sample_rate_hz != OUTPUT_RATE_HZ:  # never for Kimi-Audio's 24 kHz vocoder
            from scipy.signal import resample_poly

            samples = resample_poly(samples, OUTPUT_RATE_HZ, self.state.pipeline.c.output_sample_rate_hz)
        data = float_to_pcm16(samples)
        if self.settings.output_binary:
            await self.send_bytes(data)
        else:
            await self.send("response.audio.delta", response_id=r.id, item_id=r.item_id, output_index=0,
                            content_index=0, delta=base64.b64encode(data).decode("ascii"))
        r.sent_samples += len(samples)
        r.last_delta_at = time.perf_counter()

    async def _forward(self, r: _Response, ev: Any) -> None:
        """Other runtime events as ``kimia.<name>`` events (e.g. HistoryTrimmedEvent -> kimia.history_trimmed)."""
        name = type(ev).__name__.removesuffix("Event")
        snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
        body = asdict(ev) if is_dataclass(ev) else {}
        await self.send(f"kimia.{snake}", response_id=r.id, **{k: v for k, v in body.items()
                                                                 if isinstance(v, (int, float, str, bool, type(None)))})

    def _record_items(self, before: Any, user_item: str, r: _Response) -> None:
        """Keeps ``item_ids`` parallel to the history: a turn that ended appended (user, assistant); older turns may
        have been dropped from its front to fit the context."""
        hist = self.conversation.history
        if hist and hist[-1] is not before:
            self.item_ids += [user_item, r.item_id]
        if len(self.item_ids) > len(hist):
            self.item_ids = self.item_ids[len(self.item_ids) - len(hist):]

    # ---- truncation and the history ----
    async def truncate(self, e: Dict[str, Any]) -> None:
        item_id, end_ms = e.get("item_id"), e.get("audio_end_ms")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise ClientError("invalid_value", f"audio_end_ms: expected an integer >= 0, got {end_ms!r}",
                              "audio_end_ms")
        if e.get("content_index", 0) != 0:
            raise ClientError("invalid_value", "content_index: an assistant item has one content part (0)",
                              "content_index")
        r = self.response
        if r is None or item_id != r.item_id:
            raise ClientError("item_truncate_invalid_item_id", f"only the last assistant item ({r and r.item_id}) "
                              f"can be truncated, got {item_id!r}", "item_id")
        if not r.done:  # still running: cancel first, as an interruption does
            await self.cancel_response("client_cancelled")
            assert r.task is not None
            await asyncio.wait({r.task})
        if item_id not in self.item_ids or self.item_ids[-1] != item_id:
            raise ClientError("item_truncate_invalid_item_id", f"item {item_id} is no longer the last of the "
                              "conversation", "item_id")
        if r.truncated:
            raise ClientError("item_truncate_invalid_item_id", f"item {item_id} was truncated already", "item_id")
        played = min(r.sent_samples, end_ms * OUTPUT_RATE_HZ // 1000)
        self.pending_truncate = (item_id, played, r.sent_samples)
        await self.send("conversation.item.truncated", item_id=item_id, content_index=0,
                        audio_end_ms=played * 1000 // OUTPUT_RATE_HZ)

    def apply_truncation(self) -> None:
        p, self.pending_truncate = self.pending_truncate, None
        if p is None or not self.item_ids or self.item_ids[-1] != p[0]:
            return
        _truncate_last(self.conversation, p[1])
        if self.response is not None and self.response.item_id == p[0]:
            self.response.truncated = True

    async def retrieve(self, item_id: Any) -> None:
        """``conversation.item.retrieve``: the item as the history holds it (assistant: the text the next turn
        sees, after any truncation)."""
        r = self.response
        if r is not None and not r.done:
            raise ClientError("conversation_already_has_active_response", "retrieve items between responses")
        self.apply_truncation()
        if item_id not in self.item_ids:
            raise ClientError("item_not_found", f"no item {item_id!r} in the conversation", "item_id")
        msg = self.conversation.history[self.item_ids.index(item_id)]
        if msg["role"] == "assistant":
            content = [{"type": "audio", "transcript": msg["content"]}]
        else:
            content = [{"type": "input_audio", "transcript": None,
                        "audio_s": round(len(msg["content"]) / INPUT_SAMPLE_RATE_HZ, 3)}]
        await self.send("conversation.item.retrieved", item={"id": item_id, "object": "realtime.item",
                                                              "type": "message", "role": msg["role"],
                                                              "content": content})


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    state = websocket.app.state.kimia
    await websocket.accept(subprotocol=ws_subprotocol(websocket.headers))
    if not key_ok(websocket.headers, state.config.api_key):
        await websocket.send_text(json.dumps({"type": "error", "event_id": _id("event"), "error": {
            "type": "invalid_request_error", "code": "invalid_api_key", "message": "missing or wrong API key "
            "(Authorization: Bearer KEY or the subprotocol openai-insecure-api-key.KEY)", "param": None,
            "event_id": None}}))
        await websocket.close(code=1008, reason="invalid api key")
        return
    await _Session(websocket, state).run()
