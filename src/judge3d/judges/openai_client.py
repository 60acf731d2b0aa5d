"""The ``openai`` judge backend: any OpenAI-compatible chat-completions server read out as P(first).

Each query is one request: the prompt and both montages (after the reference image, for a prompt
naming ``<image0>``) as ``image_url`` parts, laid out as :func:`judge3d.judges.slots.prompt_content`
lays them out for the in-process judge (so against ``judge3d serve`` both paths see the same
prompt; see :mod:`judge3d.judges.serve`), with
``max_tokens=1``, ``logprobs=True`` and ``top_logprobs=N``. P(first) is read like the hf backend
reads it: each letter's log-probability is the log-sum-exp over its variants among the top
log-probabilities (bare "A" and word-initial " A"), then a softmax over the two letters. An answer
whose top log-probabilities hold neither letter is an error, never a coin flip.

Retries (timeouts, connection errors, 429 and 5xx, exponential backoff) are the ``openai``
client's own (``max_retries``); queries run ``workers`` at a time in threads.
"""
from __future__ import annotations

import base64
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from judge3d.judges.hf import ANSWER_LETTERS
from judge3d.judges.slots import prompt_content, prompt_image_count, slot_layout

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class AnswerError(RuntimeError):
    """The server's answer cannot be read as P(first); the message names the query."""


def image_data_url(image: Any) -> str:
    """A montage (path or PIL image) as a ``data:`` URL; paths are sent byte for byte."""
    from PIL import Image

    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw, mime = buf.getvalue(), "image/png"
    else:
        path = Path(image)
        mime = _MIME.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"judge image {path}: only PNG and JPEG montages can be sent ({path.suffix!r}).")
        if not path.is_file():
            raise FileNotFoundError(f"judge image {path} not found: run the render stage that makes it.")
        raw = path.read_bytes()
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def p_first_from_top_logprobs(top: Sequence[tuple[str, float]]) -> float | None:
    """P(first) from (token, logprob) pairs: log-sum-exp per letter over its variants, softmax over
    the two letters. A letter absent from the list counts as probability 0; None if both are absent."""
    per_letter: dict[str, list[float]] = {letter: [] for letter in ANSWER_LETTERS}
    for token, logprob in top:
        for letter in ANSWER_LETTERS:
            if token in (letter, " " + letter):  # the hf backend's variants (gather_answer_ids)
                per_letter[letter].append(float(logprob))
    lse = {letter: (np.logaddexp.reduce(v) if v else -math.inf) for letter, v in per_letter.items()}
    la, lb = lse[ANSWER_LETTERS[0]], lse[ANSWER_LETTERS[1]]
    if la == -math.inf and lb == -math.inf:
        return None
    return float(math.exp(la - np.logaddexp(la, lb)))


class OpenAIJudge:
    """A judge behind an OpenAI-compatible endpoint: ``p_first(pairs, prompt)`` -> P(first is better).

    ``model``: the served model id; None takes the server's only model. ``judge_id`` is
    ``model@revision[:12]`` when ``/v1/models`` reports a revision (``judge3d serve`` reports the
    weights hash, so the id equals the in-process judge's), else the model id alone.
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 top_logprobs: int = 5, workers: int = 4, max_retries: int = 3, timeout: float = 120.0):
        from openai import OpenAI

        if top_logprobs < 2:
            raise ValueError(f"top_logprobs must be >= 2 (both answer letters), got {top_logprobs}.")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        api_key = api_key or os.environ.get("JUDGE3D_SERVE_TOKEN") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)
        self.top_logprobs = int(top_logprobs)
        self.workers = int(workers)
        served = {m.id: (m.model_extra or {}).get("revision") for m in self.client.models.list()}
        if model is None:
            if len(served) != 1:
                raise ValueError(f"{base_url} serves {len(served)} models {sorted(served)}; name one with model=.")
            model = next(iter(served))
        elif model not in served:
            raise ValueError(f"{base_url} does not serve model {model!r}; it serves {sorted(served)}.")
        self.model = model
        revision = served[model]
        self.judge_id = f"{model}@{revision[:12]}" if revision else model

    def _content(self, images: Sequence[Any], prompt: str) -> list[dict]:
        """The user turn's content: ``images`` in slot order at the prompt's image parts."""
        it = iter(images)
        return [{"type": "image_url", "image_url": {"url": image_data_url(next(it))}}
                if part["type"] == "image" else part for part in prompt_content(prompt)]

    def _ask(self, index: int, images: tuple, prompt: str) -> float:
        response = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": self._content(images, prompt)}],
            max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs, temperature=0.0)
        names = ("first", "second") if len(images) == 2 else ("reference", "first", "second")
        where = f"query {index} (" + ", ".join(f"{k}={v}" for k, v in zip(names, images)) + ")"
        try:
            top = [(t.token, t.logprob) for t in response.choices[0].logprobs.content[0].top_logprobs]
        except (AttributeError, IndexError, TypeError) as exc:
            raise AnswerError(f"{self.judge_id}: {where}: the answer has no "
                              "top log-probabilities; the server must support logprobs/top_logprobs.") from exc
        p = p_first_from_top_logprobs(top)
        if p is None:
            raise AnswerError(
                f"{self.judge_id}: {where}: neither answer letter "
                f"{ANSWER_LETTERS} is among the top {self.top_logprobs} log-probabilities "
                f"({[t for t, _ in top]}); raise top_logprobs or fix the prompt so the model answers A or B.")
        return p

    def p_first(self, pairs: Sequence[tuple[Any, ...]], prompt: str) -> np.ndarray:
        """P(first) per query: (first, second), or (reference, first, second) for a prompt naming
        ``<image0>`` (the HFJudge contract)."""
        if not prompt or not prompt.strip():
            raise ValueError("judge prompt is empty: set judge.prompt in params.yaml.")
        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float64)
        n = prompt_image_count(prompt)
        pairs = [tuple(q) for q in pairs]
        for i, q in enumerate(pairs):
            if len(q) != n:
                raise ValueError(f"judge query {i} has {len(q)} images but the prompt shows {n} {slot_layout(n)}.")
        with ThreadPoolExecutor(min(self.workers, len(pairs))) as pool:
            futures = [pool.submit(self._ask, i, q, prompt) for i, q in enumerate(pairs)]
            return np.array([f.result() for f in futures], dtype=np.float64)
