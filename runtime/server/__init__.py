"""``kimia-edge serve``: an OpenAI-compatible local server over one loaded pipeline (FastAPI + uvicorn, the
``serve`` extra). Torch-free like the rest of the runtime.

    app.py         create_app(): the FastAPI app, its routers and the page at /
    config.py      ServerConfig: bind address, API key, queue and upload limits
    turns.py       TurnQueue: admission (bounded, 429 when full) and running a pipeline turn off the event loop
    openai_api.py  /health, /v1/models, /v1/audio/transcriptions, /v1/chat/completions
    realtime.py    WS /v1/realtime: live speech with server VAD and barge-in
"""
