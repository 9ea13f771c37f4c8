"""``kimia-edge serve``: an OpenAI-compatible local server over one loaded pipeline (FastAPI + uvicorn, the
``serve`` extra). Torch-free like the rest of the runtime.

    app.py          create_app(): the FastAPI app, its middleware, routers and the page at /
    config.py       ServerConfig: bind address, API key, queue, upload and step limits
    turns.py        TurnQueue: admission (bounded, 429 when full) and running a pipeline turn off the event loop
    auth.py         the API key (Bearer header, or the WebSocket subprotocol browsers can send)
    errors.py       OpenAI-shaped error bodies with their status codes
    audio_codec.py  uploads and ``input_audio`` in, wav / pcm16 out
    metrics.py      GET /metrics in Prometheus text format
    openai_api.py   /health, /v1/models, /v1/audio/transcriptions, /v1/chat/completions
    realtime.py     WS /v1/realtime: live speech with server VAD and barge-in
    static/         the live-speech page served at / (no CDN)
"""
