"""`repforce serve`: one model behind a web app and an OpenAI-compatible HTTP API, on one port.

    repforce serve --ckpt shapes --port 7860            # then open http://127.0.0.1:7860
    curl http://127.0.0.1:7860/health

Routes: `/` the web app (webapp.py: tabs Generate and Ask); `POST /v1/images/generations`;
`POST /v1/chat/completions` (an image given as a data URL in the message, OpenAI's vision format;
answering a question or, asked for a caption or with no text, captioning); `GET /v1/models`;
`GET /health`. With an API key every /v1 route needs `Authorization: Bearer KEY`.

Batching: every request (API or app) becomes a job of the one `Batcher`, which gathers jobs of
the same kind and sampling options into one batch of up to `max_batch` images, waiting at most
`max_wait` seconds for company. Each image has its own seed stream (engine.generate_arrays with a
seed per image), so an image does not depend on what it was batched with. Bad input is a 400 with
one line; more than `max_queue` images waiting is a 503 with Retry-After. Requests never name a
path to load: the model is chosen when the server starts.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (Request), which are imported inside create_app, to keep fastapi off `repforce`'s import path.
import asyncio
import base64
import binascii
import io
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np
from PIL import Image

from . import checkpoint
from .engine import InferenceError, load
from .sequence import CAPTION_QUESTION
from .service import DEFAULT, BadRequest, Limits, QueueFull, Service
from .webapp import build

def png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CAPTION_WORDS = ("caption", "describe", "description")


def chat_input(messages: Any) -> tuple[bytes, str]:
    """(image bytes, text) of an OpenAI chat: the last image given as a data URL, the last user text."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    image, text = None, None
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest("each message must be an object with a role of system, user or assistant")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRequest("message content must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text = part["text"] if m["role"] == "user" else text
            elif kind == "image_url":
                url = part.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest("images must be given as data URLs (data:image/png;base64,...); "
                                     "this server fetches nothing")
                head, _, data = url.partition(",")
                if not head.endswith(";base64"):
                    raise BadRequest("image data URL must be base64")
                try:
                    image = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    raise BadRequest("image data URL is not valid base64") from None
            else:
                raise BadRequest(f"unsupported message part {kind!r}: use text and image_url")
    if image is None:
        raise BadRequest("no image in the messages: this model answers questions about an image")
    return image, text or ""


# ---------------------------------------------------------------------- HTTP


IMAGE_FIELDS = {"prompt", "n", "model", "size", "response_format", "user", "quality", "style",
                "steps", "guidance", "rep_guidance", "seed", "temperature", "top_k"}
CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "n", "stream", "user", "seed"}


def _field(body: dict, name: str, kind: type, default):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number' if kind is float else 'a string'}")
    return v


def create_app(service: Service, api_key: str | None = None, app: bool = True):
    """The FastAPI application: the API routes, then the web app mounted at / (unless app=False)."""
    from fastapi import FastAPI, Request  # heavy, optional (repforce[serve]): off the CLI's import path
    from fastapi.responses import JSONResponse  # heavy, optional (repforce[serve])

    api = FastAPI(title=f"repforce: {service.name}", docs_url=None, redoc_url=None, openapi_url=None)
    lim = service.limits

    def error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status, headers=headers)

    @api.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > lim.max_upload_bytes:
                return error(400, f"request body of {int(size):,} bytes, at most {lim.max_upload_bytes:,}")
        return await call_next(request)

    @api.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return error(400, str(e))

    @api.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return error(503, f"server busy ({e}); retry shortly", "server_error", {"Retry-After": "1"})

    async def read_json(request: Request, fields: set[str]) -> dict:
        body = bytearray()
        async for chunk in request.stream():  # capped even without a Content-Length
            body += chunk
            if len(body) > lim.max_upload_bytes:
                raise BadRequest(f"request body over {lim.max_upload_bytes:,} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(data) - fields)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}")
        model = data.get("model")
        if model is not None and model != service.name:
            raise BadRequest(f"model {model!r} is not served here (this server serves {service.name!r})")
        return data

    async def wait(future: Future):
        try:
            return await asyncio.wrap_future(future)
        except InferenceError as e:
            raise BadRequest(str(e)) from None

    @api.get("/health")
    async def health():
        return service.health()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "repforce"}]}

    @api.post("/v1/images/generations")
    async def images(request: Request):
        b = await read_json(request, IMAGE_FIELDS)
        if _field(b, "response_format", str, "b64_json") != "b64_json":
            raise BadRequest("response_format must be b64_json (this server keeps no files to link to)")
        side = service.engine.cfg.image_size
        if _field(b, "size", str, f"{side}x{side}") not in (f"{side}x{side}", "auto"):
            raise BadRequest(f"size must be {side}x{side}, the model's size")
        o = service.options(_field(b, "steps", int, DEFAULT.steps), _field(b, "guidance", float, DEFAULT.cfg),
                            _field(b, "rep_guidance", float, DEFAULT.rep_cfg),
                            _field(b, "temperature", float, DEFAULT.rep_temperature), _field(b, "top_k", int, DEFAULT.rep_top_k))
        seed = b.get("seed")
        seed = None if seed is None else _field(b, "seed", int, 0)
        out = await wait(service.generate(_field(b, "prompt", str, ""), _field(b, "n", int, 1), seed, o))
        data = [{"b64_json": png_b64(g.image), "revised_prompt": None} for g in out]
        if out and out[0].rep is not None and out[0].rep.dtype.kind == "i":
            for d, g in zip(data, out):
                d["rep_ids"] = g.rep.tolist()  # repforce's own: the rep tokens that guided the image
        return {"created": int(time.time()), "data": data}

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        b = await read_json(request, CHAT_FIELDS)
        if b.get("stream"):
            raise BadRequest("stream=true is not supported")
        if _field(b, "n", int, 1) != 1:
            raise BadRequest("n must be 1")
        temperature = _field(b, "temperature", float, 0.0)  # greedy unless asked (OpenAI's default would be 1)
        max_tokens = _field(b, "max_completion_tokens", int, _field(b, "max_tokens", int, 40))
        image, text = chat_input(b.get("messages"))
        caption = not text.strip() or any(w in text.lower() for w in CAPTION_WORDS)
        question = CAPTION_QUESTION if caption else text
        (answer,) = await wait(service.answer(image, question, max_tokens, temperature))
        tok = service.engine.tok
        n_in, n_out = len(tok.encode(question)), len(tok.encode(answer))
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": service.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    if app:
        import gradio as gr  # heavy, optional (repforce[serve])

        api = gr.mount_gradio_app(api, build(service), path="/", ssr_mode=False, show_error=True,
                                  max_file_size=lim.max_upload_bytes)
    return api


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None, app: bool = True,
          limits: Limits = Limits(), precision: str = "fp32") -> None:
    """Load the model, then serve until interrupted (the CLI's `repforce serve`)."""
    import uvicorn  # heavy, optional (repforce[serve])

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    sock = bind(host, port)  # first, so that a taken port is one line before the model loads
    name = ckpt if ckpt in checkpoint.shipped() else checkpoint.resolve(ckpt).name
    # The model runs on the main thread and the HTTP server in a second one: on a small CPU, torch
    # called from a non-main thread measured up to 2-3x slower here (benchmarks/serve_batching.py).
    service = Service(load(checkpoint.resolve(ckpt), precision=precision), name, limits, thread=False)
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key, app), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="repforce-http").start()
    where = f"http://{host}:{sock.getsockname()[1]}"
    print(f"repforce: serving {name} ({service.engine.cfg.variant}) at {where}"
          + ("" if not app else f"; web app at {where}/") + (" (API key required)" if api_key else ""), flush=True)
    try:
        service.batcher.loop()
    finally:
        server.should_exit = True


def bind(host: str, port: int):
    """A listening TCP socket (port 0 = any free port); OSError names why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock
