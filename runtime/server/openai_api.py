"""OpenAI-shaped HTTP endpoints: /health, /v1/models, /metrics, /v1/audio/transcriptions, /v1/chat/completions.

Mapping to the runtime (docs/server.md says the same for users):
- transcriptions run the "asr" task (the official instruction; ``prompt`` is accepted for client compatibility and
  not used: the recipe's instruction is fixed); ``temperature`` samples the text stream.
- chat completions run "chat" (text + speech) when ``modalities`` holds "audio", else "qa" (a text answer). The last
  message must be the user's and carry ``input_audio``: the model answers speech. Its text parts, and every earlier
  message, become the conversation history (user audio and text; assistant text, or the transcript of an answer of
  this server referenced by ``audio.id``; system/developer text as user text: the prompt has no system role).
  ``max_tokens`` caps LLM steps (12.5 per second of speech; each step yields one text and one audio id);
  ``temperature`` samples the text stream (speech keeps the official recipe).
- speech out is 24 kHz mono: a 16-bit wav or raw pcm16 (little-endian int16) when not streamed; pcm16 chunks
  when streamed.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse

from kimia_edge.runtime.frontend import AudioFileError, check_audible, segment_30s, to_16k_mono, tokens_for_samples
from kimia_edge.runtime.generation import ContextFullError, GenerationConfig, context_steps
from kimia_edge.runtime.metrics import RunMetrics
from kimia_edge.runtime.pipeline import INPUT_SAMPLE_RATE_HZ, Conversation, Pipeline
from kimia_edge.runtime.prompt import AudioEncoding, build_prompt
from kimia_edge.runtime.server import audio_codec
from kimia_edge.runtime.server.errors import APIError, bad_param, too_large, unknown_model
from kimia_edge.runtime.server.metrics import CONTENT_TYPE
from kimia_edge.runtime.server.turns import QueueFull, Ticket
from kimia_edge.runtime.streaming import AudioEvent, Event, TextEvent
from kimia_edge.runtime.tasks import TASK_TABLE, generation_config, task_messages

router = APIRouter()
log = logging.getLogger(__name__)

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FINISH_REASONS = {"text_eos": "stop", "audio_eos": "stop", "max_tokens": "length", "context_full": "length",
                  "cancelled": "cancelled"}
AUDIO_EXPIRY_S = 3600
T = TypeVar("T")


def _state(request: Request) -> Any:
    return request.app.state.kimia


# ---- small endpoints ------------------------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> Dict[str, Any]:
    """Liveness, the model ids and the queue (``waiting``: turns behind the running one)."""
    st = _state(request)
    q = st.queue
    return {"status": "ok", "models": st.model_ids,
            "queue": {"running": q.running, "waiting": q.waiting, "max_queue": q.max_queue}}


def _model_card(model_id: str) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "kimia-edge"}


@router.get("/v1/models")
async def list_models(request: Request) -> Dict[str, Any]:
    return {"object": "list", "data": [_model_card(m) for m in _state(request).model_ids]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Dict[str, Any]:
    st = _state(request)
    if model_id not in st.model_ids:
        raise unknown_model(model_id, st.model_ids)
    return _model_card(model_id)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format (runtime/server/metrics.py lists the series)."""
    return PlainTextResponse(_state(request).metrics.render(), media_type=CONTENT_TYPE)


# ---- shared checks --------------------------------------------------------------------------------------------
def _check_model(st: Any, model: Any) -> str:
    """The model id a request names: one of ``st.model_ids`` (or the bare name, meaning the default)."""
    if model is None or model == "":
        raise bad_param("model", "required", code="missing_required_parameter")
    if model == st.config.model_name and st.model_ids:
        return st.model_ids[0]
    if model not in st.model_ids:
        raise unknown_model(model, st.model_ids)
    return str(model)


def _number(value: Any, param: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad_param(param, f"expected a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _whole(value: Any, param: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise bad_param(param, f"expected a whole number >= {lo}, got {value!r}")
    return value


def _flag(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise bad_param(param, f"expected true or false, got {value!r}")


def _content_type(request: Request, expected: str, endpoint: str) -> None:
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != expected:
        raise APIError(415, f"{endpoint} takes {expected}, got {got or 'no content type'}",
                       code="unsupported_media_type")


def _config(st: Any, task: str, seed: Optional[int], temperature: Optional[float],
            max_steps: Optional[int]) -> GenerationConfig:
    """The task's official recipe with the request's text temperature and step cap (and the server's cap)."""
    caps = [s for s in (max_steps, st.config.max_steps) if s is not None]
    config = generation_config(task, seed, step_limit=min(caps) if caps else None)
    if temperature is not None:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, temperature=temperature))
    config.validate()
    return config


def _audio_tokens(clip_16k: np.ndarray) -> AudioEncoding:
    """A stand-in for the audio tokenizer that only counts: the 12.5 Hz positions of each 30 s segment."""
    n = sum(tokens_for_samples(len(s)) for s in segment_30s(np.asarray(clip_16k)))
    return AudioEncoding(np.zeros(n, dtype=np.int64))


def prompt_positions(pipeline: Pipeline, task: str, clip_16k: np.ndarray, history: List[Dict[str, Any]]) -> int:
    """Positions of the prompt the pipeline will build for this turn (the real prompt builder, the audio only
    counted, not encoded). Raises ContextFullError when the LLM's context cannot hold it."""
    c = pipeline.c
    prompt = build_prompt(task_messages(task, clip_16k, history), TASK_TABLE[task].output_type, c.tokens,
                          c.token_offset, c.text_tokenizer.encode, _audio_tokens)
    context_steps(c.backend, len(prompt))
    return len(prompt)


def _context_error(e: ContextFullError) -> APIError:
    return APIError(400, str(e), param="messages", code="context_length_exceeded")


def _admit(st: Any) -> Ticket:
    try:
        return st.queue.admit()
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}", code="queue_full",
                       headers={"Retry-After": str(e.retry_after_s)}) from None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs ``work``; if the client disconnects first, cancels it (the turn with it) and raises ``APIError(499)``
    (nobody reads that answer). The request body must have been read already."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task.cancelled():
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()


@dataclasses.dataclass
class _Turn:
    """One admitted turn to run: its ticket, conversation, clip (16 kHz), task and settings."""

    ticket: Ticket
    conversation: Conversation
    clip: np.ndarray
    task: str
    config: GenerationConfig
    seed: Optional[int] = None


@dataclasses.dataclass
class _Collected:
    text: str
    audio: np.ndarray
    metrics: Optional[RunMetrics]


async def _whole_turn(request: Request, turn: _Turn) -> _Collected:
    """The whole turn, cancelled if the client leaves first; its failure as an APIError; the ticket released."""
    try:
        return await _unless_disconnected(request, _collect(turn))
    except Exception as e:
        raise _turn_error(e) from None
    finally:
        turn.ticket.release()


def _events(turn: _Turn) -> AsyncIterator[Event]:
    return turn.ticket.events(turn.conversation, turn.clip, INPUT_SAMPLE_RATE_HZ, turn.task, config=turn.config,
                              seed=turn.seed)


async def _collect(turn: _Turn) -> _Collected:
    """Runs a whole turn: its text, its speech [S] float32 (empty for text tasks) and its metrics."""
    text: List[str] = []
    audio: List[np.ndarray] = []
    async with aclosing(_events(turn)) as ev:
        async for event in ev:
            if isinstance(event, TextEvent):
                text.append(event.text)
            elif isinstance(event, AudioEvent):
                audio.append(event.samples)
    return _Collected("".join(text), np.concatenate(audio) if audio else np.zeros(0, np.float32),
                      _last_metrics(turn.conversation))


async def _sse_answer(turn: _Turn, on_event: Callable[[Event], Optional[Dict[str, str]]],
                      on_end: Callable[[Optional[RunMetrics]], List[Dict[str, str]]],
                      first: Sequence[Dict[str, str]] = ()) -> AsyncIterator[Dict[str, str]]:
    """A streamed answer: ``first``, ``on_event(event)`` per runtime event (None: nothing sent), then
    ``on_end(metrics)``; if the turn fails, an error event instead of the end (the response has begun: no status
    can say it). Releases the ticket at the end."""
    try:
        for out in first:
            yield out
        async with aclosing(_events(turn)) as events:
            async for event in events:
                out = on_event(event)
                if out is not None:
                    yield out
    except Exception as e:
        yield _sse(_turn_error(e).body())
        return
    finally:
        turn.ticket.release()
    for out in on_end(_last_metrics(turn.conversation)):
        yield out


def _last_metrics(conversation: Conversation) -> Optional[RunMetrics]:
    return conversation.last.metrics if conversation.last is not None else None


def _turn_error(e: BaseException) -> APIError:
    """What a failure inside a turn means to the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextFullError):
        return _context_error(e)
    if isinstance(e, AudioFileError):
        return APIError(400, str(e), code="invalid_audio")
    log.error("a turn failed", exc_info=e)
    return APIError(500, f"the turn failed ({type(e).__name__}: {e}); the server is still running",
                    code="internal_error")


def _metric_extras(m: Optional[RunMetrics]) -> Dict[str, Any]:
    """RunMetrics numbers added to ``usage`` (seconds; RTF = processing time / audio duration)."""
    if m is None:
        return {}
    return {"first_text_s": m.first_text_s, "first_audio_s": m.first_audio_s, "encode_s": m.encode_s,
            "prefill_s": m.prefill_s, "encode_rtf": m.encode_rtf, "synth_rtf": m.synth_rtf,
            "llm_steps_per_s": m.llm_steps_per_s, "output_audio_s": m.output_audio_s, "stop": m.stop}


def _sse(payload: Any) -> Dict[str, str]:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}


# ---- /v1/audio/transcriptions ---------------------------------------------------------------------------------
def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def transcription_body(text: str, duration_s: float, fmt: str, usage: Dict[str, Any], temperature: float,
                       language: Optional[str]) -> Response:
    """The answer in ``fmt``. Segments: one for the whole clip (0 s to its duration): the model gives no
    timestamps, and cutting the clip at silences would change what it hears."""
    if fmt == "json":
        return JSONResponse({"text": text, "usage": usage})
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt == "srt":
        return PlainTextResponse(f"1\n{_timestamp(0, ',')} --> {_timestamp(duration_s, ',')}\n{text}\n\n")
    if fmt == "vtt":
        return PlainTextResponse(f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(duration_s, '.')}\n{text}\n\n",
                                 media_type="text/vtt")
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(duration_s, 3), "text": text,
               "temperature": temperature}
    return JSONResponse({"task": "transcribe", "language": language or "unknown", "duration": round(duration_s, 3),
                         "text": text, "segments": [segment], "usage": {"type": "duration", "seconds": duration_s}})


async def _read_upload(st: Any, form: Any) -> bytes:
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise bad_param("file", "required: the audio file, as a multipart file part", code="missing_required_parameter")
    limit = st.config.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise too_large("file", upload.size, limit)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large("file", None, limit)
    return data


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    """Speech to text (task "asr"); multipart fields as OpenAI's: file, model, prompt, response_format,
    temperature, language, stream."""
    st = _state(request)
    _content_type(request, "multipart/form-data", "/v1/audio/transcriptions")
    async with request.form(max_files=1, max_fields=32) as form:
        _check_model(st, form.get("model"))
        fmt = form.get("response_format") or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            raise bad_param("response_format", f"expected one of {list(TRANSCRIPTION_FORMATS)}, got {fmt!r}")
        temperature = 0.0
        if form.get("temperature") not in (None, ""):
            try:
                temperature = float(form["temperature"])
            except (TypeError, ValueError):  # text that is no number, or a file part
                raise bad_param("temperature", f"expected a number from 0 to 1, got {form['temperature']!r}") from None
            _number(temperature, "temperature", 0.0, 1.0)
        stream = _flag(form.get("stream") or "false", "stream")
        if stream and fmt not in ("json", "text"):
            raise bad_param("response_format", f"stream=true gives text events; {fmt!r} is not streamed")
        language = form.get("language") or None
        data = await _read_upload(st, form)
    clip, duration_s = await anyio.to_thread.run_sync(_decode_clip, data, None, "file")
    config = _config(st, "asr", None, temperature, None)
    try:
        prompt_len = prompt_positions(st.pipeline, "asr", clip, [])
    except ContextFullError as e:
        raise _context_error(e) from None
    turn = _Turn(_admit(st), st.pipeline.conversation(keep_history=False), clip, "asr", config)

    def usage(m: Optional[RunMetrics]) -> Dict[str, Any]:
        steps = m.llm_steps if m else 0
        return {"type": "tokens", "input_tokens": prompt_len, "output_tokens": steps,
                "total_tokens": prompt_len + steps}

    if stream:
        return EventSourceResponse(_transcription_events(turn, usage), ping=15)
    got = await _whole_turn(request, turn)
    return transcription_body(got.text, duration_s, fmt, usage(got.metrics), temperature, language)


def _transcription_events(turn: _Turn, usage: Callable[[Optional[RunMetrics]], Dict[str, Any]]
                         ) -> AsyncIterator[Dict[str, str]]:
    """``transcript.text.delta`` per text piece, then ``transcript.text.done`` with the whole text and usage (what
    the openai client parses; no ``[DONE]``, as OpenAI sends none here)."""
    text: List[str] = []

    def on_event(event: Event) -> Optional[Dict[str, str]]:
        if not isinstance(event, TextEvent) or not event.text:
            return None
        text.append(event.text)
        return _sse({"type": "transcript.text.delta", "delta": event.text})

    def on_end(m: Optional[RunMetrics]) -> List[Dict[str, str]]:
        return [_sse({"type": "transcript.text.done", "text": "".join(text), "usage": usage(m)})]

    return _sse_answer(turn, on_event, on_end)


def _decode_clip(data: bytes, fmt: Optional[str], what: str) -> Tuple[np.ndarray, float]:
    """Audio bytes -> (16 kHz mono clip, duration in s); AudioFileError → 400 naming ``what``."""
    try:
        samples, rate = audio_codec.decode_audio(data, fmt, what)
        check_audible(samples, what)
    except AudioFileError as e:
        raise APIError(400, str(e), param=what, code="invalid_audio") from None
    return to_16k_mono(samples, rate), len(samples) / rate


# ---- /v1/chat/completions -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ChatRequest:
    """A checked chat request: the turn's clip (16 kHz), the history before it, and the answer's settings."""

    model: str
    clip: np.ndarray
    history: List[Dict[str, Any]]
    task: str  # "chat" (text + speech) or "qa" (text)
    audio_format: str  # wav | pcm16
    stream: bool
    include_usage: bool
    seed: Optional[int]
    temperature: Optional[float]
    max_steps: Optional[int]


def _b64_audio(st: Any, part: Any, param: str) -> Tuple[bytes, Optional[str]]:
    if not isinstance(part, dict):
        raise bad_param(param, "expected an object {data, format}")
    fmt = part.get("format")
    if fmt not in audio_codec.INPUT_FORMATS:
        raise bad_param(f"{param}.format", f"unsupported audio format {fmt!r}; expected one of "
                                           f"{list(audio_codec.INPUT_FORMATS)}", code="unsupported_format")
    data = part.get("data")
    if not isinstance(data, str) or not data:
        raise bad_param(f"{param}.data", "expected base64 audio", code="missing_required_parameter")
    limit = st.config.max_upload_bytes
    if len(data) * 3 // 4 > limit + 3:
        raise too_large(param, len(data) * 3 // 4, limit)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_param(f"{param}.data", "not valid base64", code="invalid_base64") from None
    if len(raw) > limit:
        raise too_large(param, len(raw), limit)
    return raw, fmt


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise bad_param(f"{param}[{j}]", "expected a text part here")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad_param(param, "expected a string or a list of text parts")


def _user_parts(st: Any, content: Any, param: str) -> List[Tuple[str, Any]]:
    """("text", str) / ("audio", (bytes, format)) parts of a user message, in order."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list) or not content:
        raise bad_param(param, "expected a string or a non-empty list of content parts")
    parts: List[Tuple[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            parts.append(("text", str(part.get("text", ""))))
        elif kind == "input_audio":
            parts.append(("audio", _b64_audio(st, part.get("input_audio"), f"{param}[{j}].input_audio")))
        else:
            raise bad_param(f"{param}[{j}].type", f"expected 'text' or 'input_audio', got {kind!r}")
    return parts


def parse_chat(st: Any, body: Any) -> Tuple[ChatRequest, List[Tuple[str, Any]]]:
    """Checks a chat request; returns it with the audio still encoded (bytes, format) in history slots, decoded
    later off the event loop. Raises APIError naming the field at fault."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    model = _check_model(st, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "expected a non-empty list", code="missing_required_parameter")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
        raise bad_param("modalities", f'expected ["text"] or ["text", "audio"], got {modalities!r}')
    speech = "audio" in modalities
    stream = _flag(body.get("stream", False), "stream")
    audio_opts = body.get("audio") or {}
    if not isinstance(audio_opts, dict):
        raise bad_param("audio", "expected an object {voice, format}")
    audio_format = audio_opts.get("format") or ("pcm16" if stream else "wav")
    if audio_format not in audio_codec.OUTPUT_FORMATS:
        raise bad_param("audio.format", f"expected one of {list(audio_codec.OUTPUT_FORMATS)}, got {audio_format!r}")
    if speech and stream and audio_format != "pcm16":
        raise bad_param("audio.format", "streamed speech is pcm16 chunks; ask for format 'pcm16'")
    voice = audio_opts.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise bad_param("audio.voice", f"expected a string, got {voice!r}")
    temperature = None if body.get("temperature") is None else _number(body["temperature"], "temperature", 0, 2)
    max_steps = None
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            max_steps = _whole(body[key], key, 1)
    seed = None if body.get("seed") is None else _whole(body["seed"], "seed", 0)
    if body.get("n") not in (None, 1):
        raise bad_param("n", f"only 1 choice is generated, got {body.get('n')!r}")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_param("stream_options", "expected an object {include_usage}")
    include_usage = _flag(stream_options.get("include_usage", False), "stream_options.include_usage")

    slots: List[Tuple[str, Any]] = []  # (role, ("text", str) | ("audio", (bytes, fmt)))
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            slots.append(("user", ("text", _text_of(msg.get("content"), f"{param}.content"))))
        elif role == "user":
            slots += [("user", p) for p in _user_parts(st, msg.get("content"), f"{param}.content")]
        elif role == "assistant":
            ref = msg.get("audio")
            if isinstance(ref, dict) and ref.get("id"):
                transcript = st.transcripts.get(ref["id"])
                if transcript is None:
                    raise bad_param(f"{param}.audio.id", f"unknown or expired audio id {ref['id']!r}")
                slots.append(("assistant", ("text", transcript)))
            elif msg.get("content") is not None:
                slots.append(("assistant", ("text", _text_of(msg["content"], f"{param}.content"))))
        else:
            raise bad_param(f"{param}.role", f"expected system, developer, user or assistant, got {role!r}")
    if not isinstance(messages[last], dict) or messages[last].get("role") != "user" or \
            not slots or slots[-1][1][0] != "audio":
        raise bad_param(f"messages[{last}].content",
                        "the last message must be the user's and end with an input_audio part: this model answers "
                        "speech (text-only input is not supported)", code="audio_required")
    request = ChatRequest(model, np.zeros(0, np.float32), [], "chat" if speech else "qa", audio_format, stream,
                          include_usage, seed, temperature, max_steps)
    return request, slots


def _decode_history(slots: List[Tuple[str, Any]]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """(the turn's clip, the history messages), every audio decoded to 16 kHz mono."""
    history: List[Dict[str, Any]] = []
    for n, (role, (kind, value)) in enumerate(slots):
        if kind == "text":
            if value:
                history.append({"role": role, "message_type": "text", "content": value})
            continue
        clip, _ = _decode_clip(value[0], value[1], "input_audio")
        if n == len(slots) - 1:
            return clip, history
        history.append({"role": role, "message_type": "audio", "content": clip})
    raise AssertionError("parse_chat checked that the last slot is audio")


async def _read_json(request: Request) -> Any:
    _content_type(request, "application/json", "/v1/chat/completions")
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Spoken (``input_audio``) chat: text, or text + 24 kHz speech; streamed as ``chat.completion.chunk``s."""
    st = _state(request)
    chat, slots = parse_chat(st, await _read_json(request))
    chat.clip, chat.history = await anyio.to_thread.run_sync(_decode_history, slots)
    config = _config(st, chat.task, chat.seed, chat.temperature, chat.max_steps)
    try:
        prompt_len = await anyio.to_thread.run_sync(prompt_positions, st.pipeline, chat.task, chat.clip, chat.history)
    except ContextFullError as e:
        raise _context_error(e) from None
    turn = _Turn(_admit(st), st.pipeline.conversation(keep_history=False), chat.clip, chat.task, config, chat.seed)
    turn.conversation.history = chat.history
    ids = (f"chatcmpl-{uuid.uuid4().hex}", f"audio_{uuid.uuid4().hex}", int(time.time()))
    if chat.stream:
        return EventSourceResponse(_chat_chunks(st, turn, chat, prompt_len, ids), ping=15)
    got = await _whole_turn(request, turn)
    completion_id, audio_id, created = ids
    message: Dict[str, Any] = {"role": "assistant", "content": got.text, "refusal": None}
    if chat.task == "chat":
        st.remember(audio_id, got.text)
        rate = st.pipeline.c.output_sample_rate_hz
        message["content"] = None  # as OpenAI: the text is the audio's transcript
        message["audio"] = {"id": audio_id, "expires_at": created + AUDIO_EXPIRY_S, "transcript": got.text,
                            "data": base64.b64encode(audio_codec.encode_audio(got.audio, rate, chat.audio_format))
                            .decode("ascii")}
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": created, "model": chat.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish(got.metrics)}],
        "usage": _chat_usage(prompt_len, got.metrics), "system_fingerprint": None,
    })


def _finish(m: Optional[RunMetrics]) -> str:
    return FINISH_REASONS.get(m.stop if m else "", "stop")


def _chat_usage(prompt_len: int, m: Optional[RunMetrics]) -> Dict[str, Any]:
    """OpenAI's counts (completion = LLM steps) plus the turn's RunMetrics numbers."""
    steps = m.llm_steps if m else 0
    return {"prompt_tokens": prompt_len, "completion_tokens": steps, "total_tokens": prompt_len + steps,
            **_metric_extras(m)}


def _chat_chunks(st: Any, turn: _Turn, chat: ChatRequest, prompt_len: int, ids: Tuple[str, str, int]
                 ) -> AsyncIterator[Dict[str, str]]:
    """A chunk per runtime event as it arrives, a last chunk with finish_reason, usage if asked, ``[DONE]``."""
    completion_id, audio_id, created = ids
    speech = chat.task == "chat"
    text: List[str] = []

    def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, str]:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": chat.model, "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def on_event(event: Event) -> Optional[Dict[str, str]]:
        if isinstance(event, TextEvent) and event.text:
            text.append(event.text)
            return chunk({"audio": {"id": audio_id, "transcript": event.text}} if speech else {"content": event.text})
        if isinstance(event, AudioEvent) and speech and len(event.samples):
            data = base64.b64encode(audio_codec.to_pcm16(event.samples)).decode("ascii")
            return chunk({"audio": {"id": audio_id, "data": data}})
        return None

    def on_end(m: Optional[RunMetrics]) -> List[Dict[str, str]]:
        out = []
        if speech:
            st.remember(audio_id, "".join(text))
            out.append(chunk({"audio": {"id": audio_id, "expires_at": created + AUDIO_EXPIRY_S}}, _finish(m)))
        else:
            out.append(chunk({}, _finish(m)))
        if chat.include_usage:
            out.append(_sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": chat.model, "choices": [], "usage": _chat_usage(prompt_len, m)}))
        return out + [_sse("[DONE]")]

    return _sse_answer(turn, on_event, on_end, first=[chunk({"role": "assistant", "content": None if speech else ""})])
