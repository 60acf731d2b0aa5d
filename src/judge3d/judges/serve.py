"""An OpenAI-compatible HTTP endpoint in front of an in-process :class:`~judge3d.judges.hf.HFJudge`.

``POST /v1/chat/completions`` answers one pairwise query; ``GET /v1/models`` lists the served judge
with its ``revision`` (the sha256 of its safetensors, :func:`judge3d.judges.hf.weights_sha256`).
``judge3d serve MODEL_DIR`` runs it; :class:`judge3d.judges.openai_client.OpenAIJudge` is the client.

The request convention (the client builds it from :func:`judge3d.judges.slots.prompt_content`):
one user message whose content is text parts and two ``image_url`` parts (``data:`` URLs, base64
PNG or JPEG), in the order the judge sees them: the first image is the one the prompt calls A
(``<image1>``), the second B (``<image2>``). A reference-aware query has three: the reference
(``<image0>``, the input image), then A and B. The server rebuilds the judge prompt from the parts:
the text parts joined, with the slots put where the images stand (``<image1>``, ``<image2>``; with
three images ``<image0>``, ``<image1>``, ``<image2>``); when two images come before any text, the
prompt is the text alone (HFJudge's no-slot layout: images first, then the prompt). Either way the
chat content handed to the model's template equals the one the in-process judge builds from the
same prompt, so both paths see the same tokens. ``max_tokens`` must be 1, ``logprobs`` true and
``top_logprobs`` >= 2.

The answer: one choice whose content is the more likely letter, and whose
``logprobs.content[0].top_logprobs`` holds exactly the two answer letters with
``logprob(A) = log(p_first)`` and ``logprob(B) = log(1 - p_first)``. This is the judge's
distribution renormalised over the two letters (HFJudge reads P(first) as a softmax over the A and
B token groups), not the model's full next-token distribution, so ``exp`` of the two sums to 1 and a
client recovers p_first exactly. A probability of exactly 0 is sent as ``LOGPROB_FLOOR`` (JSON
has no -inf); ``exp(LOGPROB_FLOOR)`` is 0 in float64, so the recovery stays exact.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime,
# and Request is imported inside make_app so importing this module needs no fastapi.
import base64
import binascii
import hmac
import io
import ipaddress
import math
import os
import threading
import time
from typing import Any

from judge3d.judges.hf import ANSWER_LETTERS
from judge3d.judges.slots import ALL_SLOTS, IMAGE_SLOTS

TOKEN_ENV = "JUDGE3D_SERVE_TOKEN"
LOGPROB_FLOOR = -9999.0
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
_LOOPBACK_NAMES = {"localhost"}


class ServeConfigError(RuntimeError):
    """The server cannot start as configured; the message names the setting and the fix."""


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, the message names the problem."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The bearer token to require (``token``, else $JUDGE3D_SERVE_TOKEN); refuse a non-loopback bind without one."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise ServeConfigError(
            f"refusing to serve the judge on {host!r} without a bearer token: anyone who can reach that "
            f"address could use the model. Pass --token SECRET (or set {TOKEN_ENV}), or bind 127.0.0.1.")
    return token


def letter_logprobs(p_first: float) -> dict[str, float]:
    """The two answer letters' log-probabilities of the renormalised A/B distribution."""
    p = float(p_first)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"p_first={p!r} is not a probability")
    la = math.log(p) if p > 0.0 else LOGPROB_FLOOR
    lb = math.log1p(-p) if p < 1.0 else LOGPROB_FLOOR
    return {ANSWER_LETTERS[0]: max(la, LOGPROB_FLOOR), ANSWER_LETTERS[1]: max(lb, LOGPROB_FLOOR)}


def decode_image(url: Any, index: int, max_bytes: int, max_pixels: int):
    """A ``data:image/...;base64,`` URL as an RGB PIL image; RequestError naming image ``index`` (1-based) otherwise."""
    from PIL import Image

    where = f"image {index}"
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{where}: image_url.url must be a data: URL (data:image/png;base64,...); "
                           "the server fetches no remote images.")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(f"{where}: the data: URL is not base64 (expected data:image/png;base64,...).")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise RequestError(f"{where}: over the server's limit of {max_bytes} bytes; send a smaller montage.", 413,
                           "image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: malformed base64 ({exc}).") from exc
    if len(raw) > max_bytes:
        raise RequestError(f"{where}: {len(raw)} bytes, over the server's limit of {max_bytes}; send a smaller "
                           "montage.", 413, "image_too_large")
    try:
        im = Image.open(io.BytesIO(raw))
        if im.format not in ("PNG", "JPEG"):
            raise RequestError(f"{where}: format {im.format} is not accepted; send PNG or JPEG.")
        w, h = im.size
        if w * h > max_pixels:  # checked from the header, before the pixels are decoded
            raise RequestError(f"{where}: {w}x{h} = {w * h} pixels, over the server's limit of {max_pixels}; "
                               "send a smaller montage.", 413, "image_too_large")
        return im.convert("RGB")
    except RequestError:
        raise
    except Exception as exc:  # PIL raises several types for corrupt data
        raise RequestError(f"{where}: not a readable PNG/JPEG image ({type(exc).__name__}: {exc}).") from exc


def parse_request(body: Any, max_bytes: int, max_pixels: int) -> tuple[str, list]:
    """(judge prompt, images in slot order) from a chat-completions request body: [first, second], or
    [reference, first, second] for a reference-aware query."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object (chat-completions shape).")
    if body.get("max_tokens", body.get("max_completion_tokens")) != 1:
        raise RequestError(f"max_tokens must be 1 (the judge answers one letter); got "
                           f"{body.get('max_tokens', body.get('max_completion_tokens'))!r}.")
    if body.get("logprobs") is not True:
        raise RequestError("logprobs must be true: the answer is read from the letters' log-probabilities.")
    top = body.get("top_logprobs")
    if not isinstance(top, int) or isinstance(top, bool) or top < 2:
        raise RequestError(f"top_logprobs must be an integer >= 2 (both answer letters); got {top!r}.")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
            or messages[0].get("role") != "user":
        raise RequestError("messages must hold exactly one user message (the judge query).")
    content = messages[0].get("content")
    if not isinstance(content, list):
        raise RequestError("the user message's content must be a list of text and image_url parts.")
    pieces: list[tuple[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(("text", part["text"]))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            pieces.append(("image", part["image_url"].get("url")))
        else:
            raise RequestError(f"content part {i}: expected {{'type': 'text', 'text': ...}} or "
                               f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}.")
    n_images = sum(kind == "image" for kind, _ in pieces)
    if n_images not in (2, 3):
        raise RequestError(f"the judge compares exactly two images (after a reference image, for a reference-aware "
                           f"query: three in all); the message has {n_images} image_url parts.")
    images = [decode_image(url, n + 1, max_bytes, max_pixels)
              for n, url in enumerate(v for kind, v in pieces if kind == "image")]
    texts = [v for kind, v in pieces if kind == "text"]
    if n_images == 2 and [kind for kind, _ in pieces[:2]] == ["image", "image"]:
        prompt = "".join(texts)  # HFJudge's no-slot layout: both images, then the prompt
    else:
        slots = iter(IMAGE_SLOTS if n_images == 2 else ALL_SLOTS)
        prompt = "".join(v if kind == "text" else next(slots) for kind, v in pieces)
    if not prompt.strip():
        raise RequestError("the message has no prompt text.")
    return prompt, images


def make_app(judge, *, model_id: str, revision: str, token: str | None = None,
             max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The FastAPI app serving ``judge`` (anything with ``p_first``) as ``model_id``.

    Model calls are serialised by a lock (one forward pass at a time; the judge is not thread-safe).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="judge3d judge", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    def error(status: int, message: str, code: str, headers: dict | None = None):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                       else "server_error", "code": code}}, status_code=status, headers=headers)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                  "token the server was started with.", "invalid_api_key",
                             {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "judge3d", "revision": revision}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        length = request.headers.get("content-length")
        # three base64 images (a reference-aware query) of at most max_image_bytes each, plus the text
        if length is not None and length.isdigit() and int(length) > 4 * max_image_bytes + 65536:
            return error(413, f"request body of {length} bytes is over the server's limit (three images of at most "
                              f"{max_image_bytes} bytes each)", "request_too_large")
        try:
            body = await request.json()
        except Exception:
            return error(400, "the request body is not valid JSON.", "invalid_json")
        try:
            if isinstance(body, dict) and body.get("model") not in (None, model_id):
                raise RequestError(f"model {body.get('model')!r} is not served here; this server serves "
                                   f"{model_id!r}.", 404, "model_not_found")
            prompt, images = parse_request(body, max_image_bytes, max_pixels)

            def ask():
                with lock:
                    return float(judge.p_first([tuple(images)], prompt)[0])

            p = await run_in_threadpool(ask)
        except RequestError as exc:
            return error(exc.status, str(exc), exc.code)
        except ValueError as exc:  # the judge refused the prompt (e.g. slots named twice)
            return error(400, f"the judge refused the query: {exc}", "invalid_prompt")
        lp = letter_logprobs(p)
        best = max(lp, key=lp.get)
        top = [{"token": letter, "logprob": value, "bytes": list(letter.encode())}
               for letter, value in sorted(lp.items(), key=lambda kv: -kv[1])]
        return {
            "id": f"chatcmpl-judge3d-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": best},
                         "logprobs": {"content": [{"token": best, "logprob": lp[best],
                                                   "bytes": list(best.encode()), "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }

    return app


def serve(judge, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, model_id: str,
          revision: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Run the endpoint until interrupted. ``token`` must already be resolved (:func:`resolve_token`)."""
    import uvicorn

    resolve_token(host, token)  # refuse again here, for callers that skipped it
    app = make_app(judge, model_id=model_id, revision=revision, token=token,
                   max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    uvicorn.run(app, host=host, port=port, log_level="info")
