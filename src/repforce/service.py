"""What `repforce serve` runs the model through: request checks, limits, and the batcher that gathers
concurrent requests (API and web app alike) into one sampling batch.

    service = Service(repforce.load("shapes"), "shapes")
    images = service.generate("a red circle", n=4, seed=0).result()   # [Generated(image, rep), ...]

Jobs of the same kind and sampling options share a batch of up to `max_batch` images, waiting at
most `max_wait` seconds for company. Each image has its own seed stream (engine.generate_arrays with
a seed per image), so an image does not depend on what it was batched with. Bad input is a one-line
BadRequest; more than `max_queue` images waiting is QueueFull.
"""


from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from .engine import Engine, GenOptions, InferenceError, check_options, open_image
from .sequence import CAPTION_QUESTION


DEFAULT = GenOptions()  # the engine's sampling defaults, which the API and the app also default to


@dataclass(frozen=True)
class Limits:
    max_n: int = 16  # images per generation request
    max_steps: int = 100  # ODE steps per image
    max_prompt_chars: int = 1000  # prompt or question text
    max_upload_bytes: int = 8 * 1024 * 1024  # one request body (an image travels inside it, base64)
    max_tokens: int = 64  # answer length
    max_queue: int = 512  # images (or answers) waiting before requests get 503
    max_batch: int = 64  # images (or answers) per sampling batch
    max_wait: float = 0.05  # seconds a batch waits for more requests


class BadRequest(Exception):
    """Bad input from a client: answered 400 with this one line."""

    status = 400


class QueueFull(Exception):
    """More work waiting than Limits.max_queue: answered 503 with Retry-After."""


# ---------------------------------------------------------------------- batching


@dataclass
class _Job:
    key: tuple  # kind and options: only jobs of equal keys share a batch
    items: list  # one per image or answer
    future: Future = field(default_factory=Future)


class Batcher:
    """Gathers concurrent jobs into batches for one worker thread that owns the model.

    run(key, items) -> one result per item. A batch takes the oldest job, then every waiting job of
    the same key (in arrival order) while the batch stays within max_batch items, waiting up to
    max_wait seconds for the batch to fill. A job is never split."""

    def __init__(self, run: Callable[[tuple, list], list], max_batch: int = 64, max_wait: float = 0.05,
                 max_queue: int = 512, thread: bool = True):
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.jobs: deque[_Job] = deque()
        self.waiting = 0  # items in self.jobs
        self.batches = 0  # batches run so far, and their items: the mean batch size is in /health
        self.items = 0
        self.cond = threading.Condition()
        if thread:  # else the caller runs loop() itself (serve() does, on the main thread)
            threading.Thread(target=self.loop, daemon=True, name="repforce-batcher").start()

    def submit(self, key: tuple, items: list) -> Future:
        if len(items) > self.max_batch:
            raise BadRequest(f"{len(items)} items in one request, at most {self.max_batch}")
        with self.cond:
            if self.waiting + len(items) > self.max_queue:
                raise QueueFull(f"{self.waiting} items waiting, at most {self.max_queue}")
            job = _Job(key, items)
            self.jobs.append(job)
            self.waiting += len(items)
            self.cond.notify_all()
        return job.future

    def _take(self) -> list[_Job]:
        with self.cond:
            while not self.jobs:
                self.cond.wait()
            key = self.jobs[0].key
            deadline = time.monotonic() + self.max_wait
            while (left := deadline - time.monotonic()) > 0 and \
                    sum(len(j.items) for j in self.jobs if j.key == key) < self.max_batch:
                self.cond.wait(left)
            batch, size = [], 0
            for j in list(self.jobs):
                if j.key == key and size + len(j.items) <= self.max_batch:
                    batch.append(j)
                    size += len(j.items)
                    self.jobs.remove(j)
            self.waiting -= size
            return batch

    def loop(self) -> None:
        """Run batches forever."""
        while True:
            batch = self._take()
            items = [x for j in batch for x in j.items]
            try:
                out = self.run(batch[0].key, items)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for j in batch:
                    j.future.set_exception(e)
                continue
            self.batches += 1
            self.items += len(items)
            i = 0
            for j in batch:
                j.future.set_result(out[i:i + len(j.items)])
                i += len(j.items)


# ---------------------------------------------------------------------- the service


@dataclass
class Generated:
    image: np.ndarray  # (H, W, 3) uint8
    rep: np.ndarray | None  # the rep ids (or features) that guided it


class Service:
    """The model behind both front ends: checks requests, batches them, runs the engine."""

    def __init__(self, engine: Engine, name: str, limits: Limits = Limits(), thread: bool = True):
        self.engine, self.name, self.limits = engine, name, limits
        self.created = int(time.time())
        self.batcher = Batcher(self._run, limits.max_batch, limits.max_wait, limits.max_queue, thread)

    def _run(self, key: tuple, items: list) -> list:
        if key[0] == "generate":
            _, o = key
            arr, reps = self.engine.generate_arrays([p for p, _ in items], 1, [s for _, s in items], o,
                                                    batch_size=self.limits.max_batch)
            return [Generated(a, None if reps is None else reps[i]) for i, a in enumerate(arr)]
        _, max_tokens, temperature = key
        return self.engine.answer([im for im, _ in items], [q for _, q in items], max_new_tokens=max_tokens,
                                  temperature=temperature)

    # the checks every front end goes through, each a one-line BadRequest

    def _text(self, what: str, text: Any) -> str:
        if not isinstance(text, str):
            raise BadRequest(f"{what} must be a string")
        if not text.strip():
            raise BadRequest(f"empty {what}")
        if len(text) > self.limits.max_prompt_chars:
            raise BadRequest(f"{what} of {len(text)} characters, at most {self.limits.max_prompt_chars}")
        return text

    def options(self, steps: int = DEFAULT.steps, guidance: float = DEFAULT.cfg, rep_guidance: float = DEFAULT.rep_cfg,
                temperature: float = DEFAULT.rep_temperature, top_k: int = DEFAULT.rep_top_k) -> GenOptions:
        """The engine's sampling options from the API's names, range-checked (defaults: GenOptions')."""
        if not 1 <= steps <= self.limits.max_steps:
            raise BadRequest(f"steps={steps}: must be in 1..{self.limits.max_steps}")
        o = GenOptions(steps=steps, cfg=float(guidance), rep_cfg=float(rep_guidance),
                       rep_temperature=float(temperature), rep_top_k=top_k)
        try:
            check_options(o)
        except InferenceError as e:
            raise BadRequest(str(e)) from None
        return o

    def generate(self, prompt: str, n: int = 1, seed: int | None = None, options: GenOptions | None = None) -> Future:
        """A future of n Generated, drawn with seeds seed, seed + 1, ... (random when None)."""
        if not self.engine.cfg.has_gen:
            raise BadRequest(f"model {self.name} is a vlm: it does not generate images")
        prompt = self._text("prompt", prompt)
        if not 1 <= n <= self.limits.max_n:
            raise BadRequest(f"n={n}: must be in 1..{self.limits.max_n}")
        try:
            self.engine.check_prompts([prompt])
        except InferenceError as e:
            raise BadRequest(str(e)) from None
        seed = int(np.random.randint(0, 2**31 - n)) if seed is None else seed
        if not 0 <= seed < 2**63 - n:
            raise BadRequest(f"seed={seed}: must be in 0..2^63")
        return self.batcher.submit(("generate", options or GenOptions()), [(prompt, seed + i) for i in range(n)])

    def answer(self, image: Image.Image | bytes, question: str, max_tokens: int = 40, temperature: float = 0.0) -> Future:
        """A future of [answer text]; an empty question asks for a caption."""
        question = CAPTION_QUESTION if isinstance(question, str) and not question.strip() else question
        question = self._text("question", question)
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise BadRequest(f"max_tokens={max_tokens}: must be in 1..{self.limits.max_tokens}")
        if not 0 <= temperature <= 2:
            raise BadRequest(f"temperature={temperature}: must be in 0..2")
        try:
            image = open_image(image, name="the image") if isinstance(image, bytes) else image
            self.engine.image_tensor(image)  # bad images fail here, in the request, not in the batch
        except InferenceError as e:
            raise BadRequest(str(e)) from None
        return self.batcher.submit(("answer", max_tokens, temperature), [(image, question)])

    def health(self) -> dict:
        b = self.batcher
        return {"status": "ok", "model": self.name, "variant": self.engine.cfg.variant,
                "image_size": self.engine.cfg.image_size, "waiting": b.waiting, "batches": b.batches,
                "mean_batch": round(b.items / b.batches, 2) if b.batches else None}
