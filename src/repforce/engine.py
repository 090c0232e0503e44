"""Inference: KV-cached generation (prompt -> rep tokens -> pixels) and image understanding.

    model = repforce.load("runs/pixel_rf")               # EMA weights by default
    images = model.generate(["two red circles"], n=4)   # PIL images
    model.answer([img], ["what color is the circle?"])

Generation follows docs/DESIGN.md "Sampling":
1. the prompts are left-padded, so every row's prefix ends in the same column, and
   prefilled into a KVCache, together with their text-dropped twins (empty prompt);
2. the M rep tokens are sampled one cached step at a time, logits guided against the
   text-dropped branch (weight `rep_cfg`), with temperature and top-k; the same token
   is fed to both branches;
3. the conditional prefix [prompt][BOI][reps] and the unconditional one
   [empty][BOI][null reps] (text and rep dropped together) are prefilled once, and the
   ODE runs over the N gen tokens only, attending to that frozen prefix: each step is
   one pass over N tokens per row, conditional and unconditional rows batched together.
Variants without rep tokens skip step 2; `pixel_cont` samples each continuous rep
feature with its small flow head instead; the `vae` variants decode latents with the
frozen VAE.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import checkpoint, flow, runtime
from .config import Config
from .datasources import to_rgb
from .model import RFModel
from .sequence import (
    CAPTION_QUESTION,
    ENC,
    GEN,
    REP,
    TEXT,
    Layout,
    gen_prefix,
    und_prefix,
)
from .tokenizer import load_tokenizer
from .vae import decode, load_vae


MAX_IMAGE_PIXELS = 8192 * 8192  # an image file to understand may be at most this large


class InferenceError(Exception):
    """Bad input to generation or understanding: one line, no traceback."""


@dataclass
class GenOptions:
    steps: int = 25  # ODE steps
    solver: str = "euler"  # "euler" or "heun"
    shift: float | None = None  # timestep shift s; None = flow.resolution_shift of the image (1.0 at 32 px)
    cfg: float = 3.0  # pixel guidance weight (text and rep dropped together in the other branch)
    interval: tuple[float, float] = (0.0, 1.0)  # guidance only for t in [lo, hi]
    rep_cfg: float = 2.0  # rep-token guidance weight against the text-dropped branch
    rep_temperature: float = 1.0  # rep-token sampling temperature (0 = greedy)
    rep_top_k: int = 0  # keep the k most likely rep ids (0 = all)
    use_cache: bool = True  # False recomputes the whole sequence at every step (for benchmarks and tests)


def check_options(o: GenOptions) -> None:
    """InferenceError naming the first sampling option out of its range."""
    lo, hi = o.interval
    for ok, msg in ((o.solver in ("euler", "heun"), f"solver must be euler or heun, got {o.solver!r}"),
                    (o.steps >= 1, f"steps must be >= 1, got {o.steps}"),
                    (o.shift is None or (math.isfinite(o.shift) and o.shift > 0), f"shift must be > 0, got {o.shift}"),
                    (math.isfinite(o.cfg), f"cfg must be a finite number, got {o.cfg}"),
                    (math.isfinite(o.rep_cfg), f"rep guidance must be a finite number, got {o.rep_cfg}"),
                    (math.isfinite(o.rep_temperature) and o.rep_temperature >= 0,
                     f"temperature must be >= 0, got {o.rep_temperature}"),
                    (o.rep_top_k >= 0, f"top-k must be >= 0, got {o.rep_top_k}"),
                    (0 <= lo <= hi <= 1, f"guidance interval must be 0 <= lo <= hi <= 1, got {lo},{hi}")):
        if not ok:
            raise InferenceError(msg)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C) on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _left_pad(rows: list[list[int]], kinds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token rows so they end in the same column; positions count from each row's first token."""
    n = max(len(r) for r in rows)
    B = len(rows)
    tokens = torch.zeros(B, n, dtype=torch.long)
    kind = torch.zeros(B, n, dtype=torch.long)
    pos = torch.zeros(B, n, dtype=torch.long)
    for b, (r, k) in enumerate(zip(rows, kinds)):
        p = n - len(r)
        tokens[b, p:] = torch.tensor(r)
        kind[b, p:] = torch.tensor(k)
        pos[b, p:] = torch.arange(len(r))
    return tokens, kind, pos


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, gen) -> torch.Tensor:
    """One id per row of logits (B, V): greedy at temperature 0, else sampled at that temperature
    from the top_k most likely (0 = all). The one sampler of text answers and rep tokens.
    gen: a torch.Generator, or a list of them, one per row."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(gen, list):  # one stream per row
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g)[:, 0] for b, g in enumerate(gen)])
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def randn(gen: torch.Generator | list[torch.Generator], B: int, *shape: int, device) -> torch.Tensor:
    """(B, *shape) standard normal noise from one generator, or row b from gen[b] when gen is a list
    (then a row's noise does not depend on the rows batched with it)."""
    if isinstance(gen, list):
        return torch.cat([torch.randn(1, *shape, generator=g, device=device) for g in gen])
    return torch.randn(B, *shape, generator=gen, device=device)


def open_image(src: str | Path | bytes, side: int = 0, name: str = "") -> Image.Image:
    """An RGB PIL image from a file or its bytes, or a one-line InferenceError naming it.

    The size is checked from the header before decoding (a small file may claim a huge image);
    side > 0 lets a JPEG decode at a reduced scale near that side."""
    name = name or (f"{len(src)}-byte upload" if isinstance(src, bytes) else str(src))
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InferenceError(f"image too large: {name} is {im.width}x{im.height}, more than "
                                     f"{MAX_IMAGE_PIXELS:,} pixels")
            if side:
                im.draft("RGB", (side, side))
            im.load()
            return to_rgb(im)
    except InferenceError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while opening
        raise InferenceError(f"image too large: {name} ({str(e).split(',')[0]})") from None
    except Exception as e:
        raise InferenceError(f"unreadable image: {name} ({type(e).__name__})") from None


class Engine:
    """A model, its tokenizer and (vae variants) its VAE, ready to sample."""

    def __init__(self, model: RFModel, tok, vae=None, device: str = "cpu", precision: str = "auto"):
        self.model, self.tok, self.vae = model.eval(), tok, vae
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.precision = runtime.choose_precision(precision, self.device)[0]
        self.layout = Layout.for_model(self.cfg)
        self.max_len = 512
        self.null_prompt = ""  # the text-dropped branch's prompt (training drops text to the empty prompt)

    def _autocast(self):
        return runtime.autocast(self.precision, self.device)

    # ------------------------------------------------------------------ generation

    def check_prompts(self, prompts: list[str]) -> None:
        if isinstance(prompts, str):
            raise InferenceError("prompts must be a list of strings")
        if not prompts:
            raise InferenceError("no prompts given")
        for p in prompts:
            if not p or not p.strip():
                raise InferenceError("empty prompt")
            n = len(gen_prefix(self.tok, p)) + self.layout.n_rep + self.layout.n_gen + 1
            if n > self.max_len:
                raise InferenceError(f"prompt too long: {n} positions with the image, context is {self.max_len}: {p[:40]!r}")

    def _prefill(self, h: torch.Tensor, kind: torch.Tensor, pos: torch.Tensor, extra: int):
        """A fresh cache holding the prefix; returns (cache, hidden of the prefix)."""
        cache = self.model.new_kv_cache(h.shape[0], h.shape[1] + extra, self.device)
        hidden = self.model.forward_hidden(h, kind, pos, kv_cache=cache)
        return cache, hidden

    def sample_reps(self, prompts: list[str], o: GenOptions, gen: torch.Generator, progress: bool = False):
        """Rep values of each row: ids (B, M) or continuous features (B, M, De)."""
        m, tok, c = self.model, self.tok, self.cfg
        B, M = len(prompts), c.n_rep
        rows = [gen_prefix(tok, p) for p in prompts] + [gen_prefix(tok, self.null_prompt)] * B  # cond, then text-dropped
        tokens, kind, pos = _left_pad(rows, [[TEXT] * len(r) for r in rows])
        tokens, kind, pos = tokens.to(self.device), kind.to(self.device), pos.to(self.device)
        next_pos = pos[:, -1:] + 1  # (2B, 1)
        values = []
        if o.use_cache:
            cache, hidden = self._prefill(m.embed_text(tokens), kind, pos, M)
            last = hidden[:, -1]  # (2B, D)
        for i in tqdm(range(M), disable=not progress, desc="rep tokens", leave=False):
            if not o.use_cache and i > 0:  # recompute everything: the uncached reference
                h = torch.cat([m.embed_text(tokens), m.embed_rep(torch.stack(values, 1).repeat(2, 1, *([1] * (values[0].dim() - 1))))], 1)
                k = torch.cat([kind, torch.full((2 * B, i), REP, device=self.device)], 1)
                p = torch.cat([pos, next_pos + torch.arange(i, device=self.device)], 1)
                last = m.forward_hidden(h, k, p)[:, -1]
            elif not o.use_cache:
                last = m.forward_hidden(m.embed_text(tokens), kind, pos)[:, -1]
            if c.rep_ids:
                lc, lu = m.rep_logits(last).float().chunk(2)
                v = sample_token(flow.cfg(lu, lc, o.rep_cfg), o.rep_temperature, o.rep_top_k, gen)  # (B,)
                step_in = v.repeat(2)[:, None]  # (2B, 1)
            else:  # pixel_cont: a small ODE per token over the flow head
                y0 = randn(gen, B, c.enc_dim, device=self.device)

                def v_fn(z, t):
                    zz, tt = z.repeat(2, 1), t.repeat(2)
                    x = m.cont_pred(zz.float(), tt.float(), last.float())
                    vc, vu = flow.x_to_v(x, zz, tt, c.t_eps).chunk(2)
                    return vc, vu

                v = flow.euler(v_fn, y0, steps=o.steps, w=o.rep_cfg)  # (B, De)
                step_in = v.repeat(2, 1)[:, None]  # (2B, 1, De)
            values.append(v)
            if o.use_cache and i < M - 1:
                h = m.embed_rep(step_in, start=i)
                kk = torch.full((2 * B, 1), REP, device=self.device)
                last = m.forward_hidden(h, kk, next_pos + i, kv_cache=cache, image_start=next_pos)[:, -1]
        return torch.stack(values, 1)

    def _gen_prefix_batch(self, prompts: list[str], reps: torch.Tensor | None):
        """Embeddings, kinds and positions of [cond rows; uncond rows] up to the gen block."""
        m, tok = self.model, self.tok
        B = len(prompts)
        rows = [gen_prefix(tok, p) for p in prompts] + [gen_prefix(tok, self.null_prompt)] * B
        M = self.layout.n_rep
        kinds = [[TEXT] * len(r) + [REP] * M for r in rows]
        rows = [r + [0] * M for r in rows]
        tokens, kind, pos = _left_pad(rows, kinds)
        tokens, kind, pos = tokens.to(self.device), kind.to(self.device), pos.to(self.device)
        h = m.embed_text(tokens)
        if M:
            drop = torch.arange(2 * B, device=self.device) >= B  # the unconditional rows drop the reps too
            vals = torch.cat([reps, torch.zeros_like(reps)], 0)
            h[:, -M:] = m.embed_rep(vals, drop=drop).to(h.dtype)
        return h, kind, pos

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A sampled gen tensor as (B, 3, H, W) images in [-1, 1]: VAE latents decoded, one channel repeated."""
        if self.cfg.variant.startswith("vae"):
            x = decode(self.vae, x)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def sample_pixels(self, prompts: list[str], reps, o: GenOptions, gen: torch.Generator, progress: bool = False):
        """The gen tensor (B, C, Hg, Wg) by the ODE over the gen block against the frozen prefix."""
        m, c = self.model, self.cfg
        B, N = len(prompts), c.n_gen
        h, kind, pos = self._gen_prefix_batch(prompts, reps)
        gkind = torch.full((2 * B, N), GEN, device=self.device)
        gpos = pos[:, -1:] + 1 + torch.arange(N, device=self.device)  # (2B, N)
        if o.use_cache:
            cache, _ = self._prefill(h, kind, pos, N)
        bar = tqdm(total=o.steps * (2 if o.solver == "heun" else 1), disable=not progress, desc="pixels", leave=False)

        def v_fn(z, t):
            zz, tt = torch.cat([z, z]), torch.cat([t, t])
            hg = m.embed_gen(zz, tt)
            if o.use_cache:
                hid = m.forward_hidden(hg, gkind, gpos, kv_cache=cache, commit=False)
            else:
                hid = m.forward_hidden(torch.cat([h, hg], 1), torch.cat([kind, gkind], 1), torch.cat([pos, gpos], 1))[:, -N:]
            x = m.gen_pred(hid).float()
            bar.update(1)
            vc, vu = flow.x_to_v(x, zz.float(), tt.float(), c.t_eps).chunk(2)
            return vc, vu

        z0 = randn(gen, B, c.gen_channels, c.gen_size, c.gen_size, device=self.device)
        shift = o.shift if o.shift is not None else flow.resolution_shift(c.image_size)
        solve = {"euler": flow.euler, "heun": flow.heun}[o.solver]
        out = solve(v_fn, z0, steps=o.steps, shift=shift, w=o.cfg, interval=o.interval)
        bar.close()
        return out

    @torch.no_grad()
    def generate_arrays(self, prompts: list[str], n: int = 1, seed: int | list[int] = 0, options: GenOptions | None = None,
                        batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images (P * n, H, W, 3), prompt-major, and the rep values that guided them.

        seed: one seed for the whole call, or one per image (P * n of them): then each image is
        drawn from its own stream and does not depend on what it is batched with (the server).
        A gray model (model.image_channels=1) gives its one channel replicated to RGB, so that
        every consumer (PNG files, grids, judges) sees the same layout."""
        if not self.cfg.has_gen:
            raise InferenceError("this model is a vlm: it does not generate images")
        self.check_prompts(prompts)
        o = options or GenOptions()
        check_options(o)
        rows = [p for p in prompts for _ in range(n)]
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(rows):
                raise InferenceError(f"{len(seed)} seeds for {len(rows)} images")
            streams = [torch.Generator(self.device).manual_seed(int(x)) for x in seed]
        else:
            gen = torch.Generator(self.device).manual_seed(seed)
        images, reps = [], []
        for s in tqdm(range(0, len(rows), batch_size), disable=not progress or len(rows) <= batch_size, desc="batches"):
            chunk = rows[s:s + batch_size]
            if isinstance(seed, (list, tuple)):
                gen = streams[s:s + batch_size]
            with self._autocast():
                r = self.sample_reps(chunk, o, gen, progress) if self.cfg.rep_slots else None
                x = self.sample_pixels(chunk, r, o, gen, progress)
            images.append(to_uint8(self.to_pixels(x)))
            if r is not None:
                reps.append(r.float().cpu().numpy() if r.dtype != torch.long else r.cpu().numpy())
        return np.concatenate(images), (np.concatenate(reps) if reps else None)

    def generate(self, prompts: list[str], n: int = 1, seed: int = 0, **kw) -> list[Image.Image]:
        """PIL images, n per prompt, prompt-major. Keyword options: those of GenOptions."""
        opts = GenOptions(**{k: v for k, v in kw.items() if k in GenOptions.__dataclass_fields__})
        arr, _ = self.generate_arrays(prompts, n, seed, opts, progress=kw.get("progress", False))
        return [Image.fromarray(a) for a in arr]

    # ------------------------------------------------------------------ understanding

    def image_tensor(self, img) -> torch.Tensor:
        """(C, s, s) in [-1, 1], C = the model's image channels: RGB is averaged for a gray model, gray replicated
        for an RGB one."""
        s, c = self.cfg.image_size, self.cfg.image_channels
        if isinstance(img, (str, Path, bytes)):
            img = open_image(img, s)
        if isinstance(img, Image.Image):
            img = to_rgb(img)
            if img.size != (s, s):
                img = img.resize((s, s), Image.BICUBIC)
            img = np.asarray(img)
        arr = np.asarray(img)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.shape[:2] != (s, s) or arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise InferenceError(f"image must be {s}x{s} RGB or gray, got array of shape {arr.shape}")
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
        if x.shape[0] != c:
            x = x.mean(0, keepdim=True) if c == 1 else x.expand(3, -1, -1)
        return x / 127.5 - 1

    @torch.no_grad()
    def answer(self, images, questions: list[str], max_new_tokens: int = 40, temperature: float = 0.0,
               seed: int = 0, use_cache: bool = True) -> list[str]:
        """Answers to questions about images (greedy when temperature is 0), stopping at EOS."""
        if len(images) != len(questions):
            raise InferenceError(f"{len(images)} images for {len(questions)} questions")
        if not questions:
            return []
        m, tok = self.model, self.tok
        x = torch.stack([self.image_tensor(i) for i in images]).to(self.device)
        built = [und_prefix(tok, self.layout, q) for q in questions]
        tokens, kind, pos = _left_pad([b[0] for b in built], [b[1] for b in built])
        tokens, kind, pos = tokens.to(self.device), kind.to(self.device), pos.to(self.device)
        if tokens.shape[1] + max_new_tokens > self.max_len:
            raise InferenceError(f"question too long for the context of {self.max_len}")
        gen = torch.Generator(self.device).manual_seed(seed)
        B = len(questions)
        out = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        with self._autocast():
            h = m.embed_text(tokens)
            h[kind == ENC] = m.embed_image(x).reshape(-1, h.shape[-1]).to(h.dtype)
            if use_cache:
                cache, hidden = self._prefill(h, kind, pos, max_new_tokens)
            else:
                hidden = m.forward_hidden(h, kind, pos)
            last = hidden[:, -1]
            base = pos[:, -1:] + 1  # (B, 1): position of the first answer token
            for i in range(max_new_tokens):
                nxt = sample_token(m.lm_logits(last), temperature, 0, gen)
                nxt = torch.where(done, tok.eos_id, nxt)
                out = torch.cat([out, nxt[:, None]], 1)
                done |= nxt == tok.eos_id
                if done.all():
                    break
                step_pos = base + i
                if use_cache:
                    last = m.forward_hidden(m.embed_text(nxt[:, None]), torch.full((B, 1), TEXT, device=self.device),
                                            step_pos, kv_cache=cache)[:, -1]
                else:
                    h = torch.cat([h, m.embed_text(nxt[:, None]).to(h.dtype)], 1)
                    kind = torch.cat([kind, torch.full((B, 1), TEXT, device=self.device)], 1)
                    pos = torch.cat([pos, step_pos], 1)
                    last = m.forward_hidden(h, kind, pos)[:, -1]
        texts = []
        for row in out.tolist():
            row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
            texts.append(tok.decode(row))
        return texts

    def caption(self, images, **kw) -> list[str]:
        return self.answer(images, [CAPTION_QUESTION] * len(images), **kw)

    @torch.no_grad()
    def answer_logprob(self, images, questions: list[str], answers: list[str]) -> list[tuple[float, bool]]:
        """(log-probability of each answer's tokens after its image and question, whether greedy
        decoding yields exactly those tokens): what multiple-choice benchmarks score. The answer is
        tokenized alone and without its EOS, as training tokenizes answers."""
        if not len(images) == len(questions) == len(answers):
            raise InferenceError(f"{len(images)} images, {len(questions)} questions, {len(answers)} answers")
        if not questions:
            return []
        m, tok = self.model, self.tok
        ans = [tok.encode(a) for a in answers]
        if not all(ans):
            raise InferenceError("empty answer")
        x = torch.stack([self.image_tensor(i) for i in images]).to(self.device)
        built = [und_prefix(tok, self.layout, q) for q in questions]
        tokens, kind, pos = _left_pad([b[0] + a for b, a in zip(built, ans)],
                                      [b[1] + [TEXT] * len(a) for b, a in zip(built, ans)])
        if tokens.shape[1] > self.max_len:
            raise InferenceError(f"question and answer too long for the context of {self.max_len}")
        tokens, kind, pos = tokens.to(self.device), kind.to(self.device), pos.to(self.device)
        with self._autocast():
            h = m.embed_text(tokens)
            h[kind == ENC] = m.embed_image(x).reshape(-1, h.shape[-1]).to(h.dtype)
            hidden = m.forward_hidden(h, kind, pos)  # (B, L, D)
        L, out = tokens.shape[1], []
        for b, a in enumerate(ans):  # rows are left-padded: every answer ends in the last column
            n = len(a)
            logp = m.lm_logits(hidden[b, L - n - 1:L - 1]).float().log_softmax(-1)  # (n, V): position i predicts i + 1
            target = tokens[b, L - n:]
            out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        return out


# ---------------------------------------------------------------------- loading


def _find_up(start: Path, name: str) -> Path | None:
    for d in (start, *start.parents):
        if (d / name).exists():
            return d / name
    return None


def load(path: str | Path, device: str = "cpu", ema: bool = True, precision: str = "auto") -> Engine:
    """An Engine from a run folder, its checkpoints folder or one step folder (EMA weights by default)."""
    try:
        d = checkpoint.find(Path(path))
        state, cfg_json = checkpoint.read(d)
    except checkpoint.CheckpointError as e:
        raise InferenceError(str(e)) from None
    try:
        cfg = Config.from_json(cfg_json)
        model = RFModel(cfg.model)
        model.load_state_dict(state["ema" if ema else "model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InferenceError(f"incompatible checkpoint {d}: {str(e).splitlines()[0]}") from None
    tok_dir = _find_up(d, "tokenizer")
    if tok_dir is None:
        raise InferenceError(f"no tokenizer/ folder beside the run of {d}")
    tok = load_tokenizer(tok_dir)
    if len(tok) != cfg.model.vocab_size:
        raise InferenceError(f"tokenizer in {tok_dir} has {len(tok)} tokens, the model {cfg.model.vocab_size}")
    vae = None
    if cfg.model.variant.startswith("vae"):
        vae_dir = Path(cfg.train.vae)
        if not vae_dir.is_absolute() and not vae_dir.exists():
            vae_dir = d.parent.parent.parent / cfg.train.vae
        try:
            vae = load_vae(vae_dir)
        except FileNotFoundError as e:
            raise InferenceError(str(e)) from None
    return Engine(model.to(device), tok, vae, device, precision)
