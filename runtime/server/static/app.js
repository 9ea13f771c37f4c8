// The live-speech page: microphone -> pcm16 24 kHz -> WS /v1/realtime (server VAD); response.audio.delta -> an
// AudioWorklet queue; barge-in by speaking or with Stop (response.cancel + conversation.item.truncate with the
// audio actually played). window.kimia exposes counters for tests.
"use strict";
const RATE = 24000;
const $ = (id) => document.getElementById(id);
window.kimia = { playedSamples: 0, receivedSamples: 0, responses: [], errors: [], transcript: "", truncated: [] };

let ws = null, ctx = null, player = null, mic = null;
let active = null;         // {id, item} of the response streaming now
let lastItem = null;       // the assistant item whose audio was queued last
const received = {};       // item -> samples received
const truncated = new Set();
let assistantDiv = null;

function status(text) { $("status").textContent = text; }

function addTurn(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}

function b64ToFloat(b64) {
  const bin = atob(b64);
  const n = bin.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function floatToB64(x) {
  const bytes = new Uint8Array(x.length * 2);
  for (let i = 0; i < x.length; i++) {
    const v = Math.max(-32768, Math.min(32767, Math.round(x[i] * 32767)));
    bytes[2 * i] = v & 0xff;
    bytes[2 * i + 1] = (v >> 8) & 0xff;
  }
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

// Stops playback now and tells the server how much of the last answer was heard (the history keeps only that).
function interrupt(cancelResponse) {
  if (cancelResponse && active) send({ type: "response.cancel" });
  const item = lastItem;
  player.port.postMessage({ type: "flush" });
  const onFlushed = (e) => {
    if (e.data.type !== "flushed") return;
    player.port.removeEventListener("message", onFlushed);
    const played = e.data.played[item] || 0;
    if (item && !truncated.has(item) && played < (received[item] || 0)) {
      truncated.add(item);
      send({ type: "conversation.item.truncate", item_id: item, content_index: 0,
             audio_end_ms: Math.floor(played * 1000 / RATE) });
    }
  };
  player.port.addEventListener("message", onFlushed);
}

function onEvent(e) {
  switch (e.type) {
    case "session.created":
    case "session.updated":
      break;
    case "input_audio_buffer.speech_started":
      status("listening…");
      if (lastItem) interrupt(false);  // the server cancels a running response itself (server VAD)
      break;
    case "input_audio_buffer.speech_stopped":
      status("thinking…");
      break;
    case "input_audio_buffer.committed":
      addTurn("user", "you: (speech)");
      break;
    case "response.created":
      active = { id: e.response.id, item: null };
      assistantDiv = addTurn("assistant", "kimi: ");
      $("stop").disabled = false;
      break;
    case "response.audio_transcript.delta":
      if (assistantDiv) assistantDiv.textContent += e.delta;
      window.kimia.transcript += e.delta;
      break;
    case "response.audio.delta": {
      const samples = b64ToFloat(e.delta);
      lastItem = e.item_id;
      if (active) active.item = e.item_id;
      received[e.item_id] = (received[e.item_id] || 0) + samples.length;
      window.kimia.receivedSamples += samples.length;
      player.port.postMessage({ type: "chunk", item: e.item_id, samples }, [samples.buffer]);
      status("speaking…");
      break;
    }
    case "response.done": {
      const r = e.response, m = r.metrics || {};
      active = null;
      window.kimia.responses.push(r);
      if (r.status === "cancelled" && assistantDiv) assistantDiv.classList.add("cancelled");
      const fmt = (v, d = 2) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
      addTurn("metrics", `${r.status}: first audio ${fmt(m.first_audio_s)} s, ${m.llm_steps || 0} steps ` +
        `(${fmt(m.llm_steps_per_s, 1)}/s), audio ${fmt(m.output_audio_s)} s, synth RTF ${fmt(m.synth_rtf)}` +
        (m.cancel_to_done_s !== undefined ? `, cancel→done ${fmt(m.cancel_to_done_s, 3)} s` : ""));
      status("listening…");
      break;
    }
    case "conversation.item.truncated":  // the server cut that answer in the history to what was heard
      window.kimia.truncated.push({ item: e.item_id, audio_end_ms: e.audio_end_ms,
                                    received_ms: Math.floor((received[e.item_id] || 0) * 1000 / RATE) });
      break;
    case "error":
      window.kimia.errors.push(e.error);
      addTurn("metrics", "error: " + e.error.code + ": " + e.error.message);
      break;
  }
}

async function start() {
  $("start").disabled = true;
  try {
    ctx = new AudioContext({ sampleRate: RATE });
    await ctx.audioWorklet.addModule("/static/audio-worklet.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    player = new AudioWorkletNode(ctx, "pcm-player", { outputChannelCount: [1] });
    player.port.onmessage = (e) => {
      if (e.data.type === "played") {
        window.kimia.playedSamples = Object.values(e.data.played).reduce((a, b) => a + b, 0);
      }
    };
    player.port.start();
    player.connect(ctx.destination);

    const key = $("key").value.trim();
    const protocols = ["realtime"].concat(key ? ["openai-insecure-api-key." + key] : []);
    ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime", protocols);
    ws.onmessage = (m) => { if (typeof m.data === "string") onEvent(JSON.parse(m.data)); };
    ws.onclose = (c) => { status(`disconnected (${c.code}${c.reason ? ": " + c.reason : ""})`); stop(true); };
    await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("cannot connect")); });
    const maxTokens = parseInt($("maxTokens").value, 10);
    send({ type: "session.update", session: {
      turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 600 },
      input_audio_format: "pcm16", input_audio_sample_rate: RATE, output_audio_format: "pcm16",
      max_response_output_tokens: Number.isFinite(maxTokens) ? maxTokens : "inf" } });

    mic = ctx.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(ctx, "pcm-capture", { processorOptions: { chunk: 960 } });
    capture.port.onmessage = (m) => send({ type: "input_audio_buffer.append", audio: floatToB64(m.data) });
    mic.connect(capture);  // not connected to the destination: the microphone is not played back
    $("stop").disabled = false;
    status("listening…");
  } catch (err) {
    status("cannot start: " + err.message);
    $("start").disabled = false;
  }
}

function stop(closed) {
  if (!closed && player) interrupt(true);
  if (closed) $("start").disabled = false;
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop(false));
