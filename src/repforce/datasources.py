"""Real image-text data: webdataset tar shards, Hugging Face `datasets` folders, JSONL folders.

    --set data.world=mix --set 'mix.sources=[{"kind": "wds", "path": "/data/laion", "weight": 3},
                                             {"kind": "jsonl", "path": "/data/llava", "task": "und"}]'

Every source is indexed, so item i of a source can be read directly:

    wds    a folder of *.tar shards (webdataset layout: files sharing a key before the first
           dot form a sample: key.jpg + key.txt or key.json). Each shard's member offsets
           are scanned once and cached beside it (`<shard>.idx.json`) or in memory.
    hf     a folder written by `datasets.Dataset.save_to_disk` (split "train" of a DatasetDict),
           columns image (Image feature, bytes or a path) and caption/text/prompt or conversations.
    jsonl  a folder holding index.jsonl (or a .jsonl file), one sample per line:
           {"image": "relative/path.jpg", "caption": "..."} or LLaVA's
           {"image": ..., "conversations": [{"from": "human", "value": "<image>\\nQ"},
                                            {"from": "gpt", "value": "A"}, ...]}

Sample j of the run (j = step * batch_size + i) is a pure function of j: its source comes
from a shuffled pattern of 1000 slots laid out by the mixture weights, its item from a
seeded pseudo-random permutation of that source (a new one each epoch of it). So a run
resumes exactly from its step on any number of ranks, and rank r of w loads only the
samples of its slice (`local_batch`), each batch prepared by one of `mix.workers` worker
processes (sharded by rank and worker).

Images of any size and aspect are resized (shorter side to the model's image side) and
center-cropped: one square resolution bucket per stage. Non-RGB images are converted
(alpha composited on white, CMYK and grayscale to RGB) and counted. A bad sample
(unreadable or truncated file, not an image, empty caption or conversation, a giant
image, a shard that does not open) is replaced by another item of the same source,
counted per reason, logged with an example the first time, and reported in log.jsonl
(`skip_<reason>`). More than `mix.max_skip_frac` of the samples read skipped stops the
run with the counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .sequence import collate, guidance_drops, rows

log = logging.getLogger("repforce.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_KEYS = ("caption", "text", "prompt", "txt")
CAPTION_QUESTIONS = ("Describe the image.", "What is in this picture?", "Write a caption for this image.")
PATTERN = 1000  # slots of the mixture pattern


class DataError(RuntimeError):
    """Data that cannot feed the run: too many bad samples, or a source with nothing usable."""


class Skip(Exception):
    """One bad sample; `reason` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- seeded addressing


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def permute(i: int, n: int, key) -> int:
    """A pseudo-random bijection of [0, n): a 4-round Feistel network on the next even bit width,
    cycle-walking back into range. O(1) memory, so a source of any size is shuffled per epoch."""
    if n <= 1:
        return 0
    bits = max(2, (n - 1).bit_length() + ((n - 1).bit_length() & 1))
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_hash(key, r, right) & mask)
        x = (left << half) | right
        if x < n:
            return x


class Plan:
    """Which (source, item) sample j of the run is: a pure function of j."""

    def __init__(self, weights: list[float], sizes: list[int], seed: int):
        w = np.asarray(weights, dtype=float) / sum(weights)
        counts = np.floor(w * PATTERN).astype(int)
        for k in np.argsort(-(w * PATTERN - counts))[:PATTERN - counts.sum()]:  # largest remainders
            counts[k] += 1
        slots = np.repeat(np.arange(len(w)), counts)
        np.random.default_rng([seed, 7]).shuffle(slots)
        self.slots, self.counts, self.sizes, self.seed = slots, counts, sizes, seed
        self.rank = np.zeros(PATTERN, dtype=np.int64)  # slot -> how many earlier slots hold its source
        seen = Counter()
        for p, s in enumerate(slots):
            self.rank[p], seen[s] = seen[s], seen[s] + 1

    def locate(self, j: int, attempt: int = 0) -> tuple[int, int]:
        s = int(self.slots[j % PATTERN])
        k = (j // PATTERN) * int(self.counts[s]) + int(self.rank[j % PATTERN])  # this source's k-th draw
        n = self.sizes[s]
        if attempt:  # a replacement for a bad item: another pseudo-random item of the same source
            return s, _hash(self.seed, j, attempt) % n
        return s, permute(k % n, n, (self.seed, s, k // n))


# ----------------------------------------------------------------------------- sources


def _text_of(meta: dict) -> str | None:
    for k in TEXT_KEYS:
        if isinstance(meta.get(k), str):
            return meta[k]
    return None


def _turns(conversations) -> list[tuple[str, str]]:
    """LLaVA turns -> [(question, answer)], the <image> placeholder removed."""
    turns, question = [], None
    for t in conversations or []:
        role, value = t.get("from", t.get("role")), (t.get("value", t.get("content")) or "")
        value = value.replace("<image>", "").strip()
        if role in ("human", "user"):
            question = value
        elif role in ("gpt", "assistant") and question is not None:
            turns.append((question, value.strip()))
            question = None
    return turns


class WdsSource:
    """webdataset tar shards, indexed: item -> (shard, member offsets). Bad shards are left out, counted."""

    def __init__(self, path: str):
        p = Path(path)
        shards = [p] if p.is_file() else sorted(p.glob("*.tar"))
        self.items: list[tuple[int, dict]] = []  # (shard index, {ext: (offset, size)})
        self.shards, self.bad_shards = [], Counter()
        for shard in shards:
            try:
                index = self._index(shard)
            except Exception as e:  # not a tar, truncated header, unreadable
                self.bad_shards["bad_shard"] += 1
                log.warning("data: skipping shard %s (%s: %s)", shard, type(e).__name__, e)
                continue
            n = len(self.shards)
            self.shards.append(str(shard))
            self.items += [(n, members) for _, members in sorted(index.items())]
        self._files: dict[int, object] = {}

    @staticmethod
    def _index(shard: Path) -> dict:
        cache = shard.with_name(shard.name + ".idx.json")
        stat = shard.stat()
        if cache.exists():
            c = json.loads(cache.read_text())
            if c.get("size") == stat.st_size and c.get("mtime") == stat.st_mtime:
                return c["samples"]
        samples: dict[str, dict] = {}
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)
                base = name[-1]
                if "." not in base:
                    continue
                key = (name[0] + "/" if len(name) > 1 else "") + base.split(".", 1)[0]
                samples.setdefault(key, {})[base.split(".", 1)[1].lower()] = (m.offset_data, m.size)
        try:  # cache beside the shard when the folder is writable
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"size": stat.st_size, "mtime": stat.st_mtime, "samples": samples}))
            tmp.replace(cache)
        except OSError:
            pass
        return samples

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, where) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        f.seek(where[0])
        data = f.read(where[1])
        if len(data) != where[1]:
            raise Skip("truncated", f"{self.shards[shard]} ends inside a member")
        return data

    def get(self, i: int) -> dict:
        shard, members = self.items[i]
        img = next((e for e in IMAGE_EXTS if e in members), None)
        if img is None:
            raise Skip("no_image", f"{self.shards[shard]} item {i}: no image member")
        out = {"image": self._read(shard, members[img]), "id": f"{Path(self.shards[shard]).name}#{i}"}
        if "json" in members:
            try:
                meta = json.loads(self._read(shard, members["json"]))
            except ValueError as e:
                raise Skip("bad_json", str(e)) from None
            out["caption"], out["conversations"] = _text_of(meta), meta.get("conversations")
        for ext in ("txt", "caption", "text"):
            if ext in members and not out.get("caption"):
                out["caption"] = self._read(shard, members[ext]).decode("utf-8", "replace")
        return out


class HFSource:
    """A `datasets` folder written by save_to_disk; images decoded here, not by datasets."""

    def __init__(self, path: str):
        import datasets  # heavy (pyarrow): imported only for hf sources

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if "image" in ds.features and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # bytes: we decode and check them
        self.ds, self.root = ds, Path(path)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, i: int) -> dict:
        row = self.ds[i]
        img = row.get("image")
        if isinstance(img, dict):
            img = img.get("bytes") or img.get("path")
        if isinstance(img, str):
            img = _read_file(self.root, img)
        if img is None:
            raise Skip("no_image", f"row {i}")
        return {"image": img, "caption": _text_of(row), "conversations": row.get("conversations"), "id": f"row {i}"}


def _read_file(root: Path, rel: str) -> bytes:
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    try:
        return path.read_bytes()
    except OSError as e:
        raise Skip("missing_file", f"{path}: {e.strerror}") from None


class JsonlSource:
    """index.jsonl (or a .jsonl file) with image paths relative to its folder; lines read by byte offset."""

    def __init__(self, path: str):
        p = Path(path)
        self.file = p if p.is_file() else p / "index.jsonl"
        if not self.file.exists():
            raise DataError(f"jsonl source {path}: no index.jsonl")
        self.root = self.file.parent
        offsets, pos = [], 0
        with open(self.file, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._f = None

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, i: int) -> dict:
        if self._f is None:
            self._f = open(self.file, "rb")
        self._f.seek(int(self.offsets[i]))
        try:
            meta = json.loads(self._f.readline())
        except ValueError as e:
            raise Skip("bad_json", f"{self.file} line {i}: {e}") from None
        if not isinstance(meta.get("image"), str):
            raise Skip("no_image", f"{self.file} line {i}")
        return {"image": _read_file(self.root, meta["image"]), "caption": _text_of(meta),
                "conversations": meta.get("conversations"), "id": f"{self.file.name}:{i}"}


OPEN = {"wds": WdsSource, "hf": HFSource, "jsonl": JsonlSource}


# ----------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: transparency over a white page (as the data loaders do), the rest converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit gray: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = arr * (255.0 / (65535.0 if hi > 255 else 255.0))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(data: bytes, side: int, max_pixels: int, converted: Counter) -> np.ndarray:
    """Bytes -> (side, side, 3) uint8: checked, converted to RGB, resized and center-cropped."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not_image", "unidentified image data") from None
    except Image.DecompressionBombError as e:  # a small file claiming a huge image
        raise Skip("giant", str(e).split(",")[0]) from None
    except Exception as e:
        raise Skip("not_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Skip("giant", f"{w}x{h} > {max_pixels} pixels")
    if min(w, h) < 1:
        raise Skip("not_image", f"{w}x{h}")
    try:
        img.draft("RGB", (side, side))  # JPEG: decode at a reduced scale when much larger
        img.load()
    except Exception as e:  # truncated or corrupt data
        raise Skip("truncated", f"{type(e).__name__}: {e}") from None
    if img.mode != "RGB":
        converted[f"converted_{img.mode.lower()}"] += 1
        img = to_rgb(img)  # alpha over a white page; CMYK, L, I;16, P, ... converted
    img = ImageOps.fit(img, (side, side), method=Image.BICUBIC)  # shorter side to `side`, center crop
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------- samples and batches


class MixDataset:
    """Loads and collates one rank's share of a step's batch (in a worker process)."""

    def __init__(self, cfg, tok, layout):
        self.cfg, self.tok, self.layout = cfg, tok, layout
        self.mix, self.data, self.side = cfg.mix, cfg.data, cfg.model.image_size
        self.sources = [OPEN[s.kind](s.path) for s in self.mix.sources]
        for s, src in zip(self.mix.sources, self.sources):
            if len(src) == 0:
                raise DataError(f"source {s.kind}:{s.path} has no usable samples")
        self.plan = Plan([s.weight for s in self.mix.sources], [len(s) for s in self.sources], self.data.seed)
        self.vlm = cfg.model.variant == "vlm"

    def opening_skips(self) -> Counter:
        c = Counter()
        for src in self.sources:
            c.update(getattr(src, "bad_shards", {}))
        return c

    def sample(self, j: int, skips: Counter, converted: Counter, examples: dict) -> tuple:
        """(is_gen, image, text, turns, drop_rep) of sample j, replacing bad items."""
        rng = np.random.default_rng([self.data.seed, j, 11])
        for attempt in range(self.mix.retries + 1):
            s, i = self.plan.locate(j, attempt)
            spec = self.mix.sources[s]
            try:
                raw = self.sources[s].get(i)
                turns = _turns(raw.get("conversations"))
                caption = (raw.get("caption") or "").strip()
                is_gen = not self.vlm and (spec.task == "gen" or (spec.task == "both" and
                                                                  rng.random() < self.data.gen_fraction))
                if spec.task == "und" and not turns:
                    raise Skip("empty_text", f"{raw.get('id')}: no conversation turns")
                if spec.task != "und" and not caption and not turns:
                    raise Skip("empty_text", f"{raw.get('id')}: empty caption")
                image = load_image(raw["image"], self.side, self.mix.max_pixels, converted)
            except Skip as e:
                skips[e.reason] += 1
                examples.setdefault(e.reason, f"{spec.kind}:{spec.path} item {i}: {e.detail}")
                continue
            if is_gen:
                drop_text, drop_rep = guidance_drops(self.data, rng)
                return True, image, "" if drop_text else caption, [], drop_rep
            if not turns:  # a caption source read for understanding: captioning
                turns = [(CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))], caption)]
            return False, image, None, turns, False
        raise DataError(f"sample {j}: {self.mix.retries + 1} draws from source {spec.kind}:{spec.path} were all bad "
                        f"({dict(skips)}; e.g. {examples})")

    def batch(self, step: int, batch_size: int, rank: int, world: int) -> dict:
        b = batch_size // world
        first = step * batch_size + rank * b
        skips, converted, examples = Counter(), Counter(), {}
        samples = [self.sample(first + i, skips, converted, examples) for i in range(b)]
        r = [rows(self.tok, self.layout, g, t, turns, self.mix.max_text_tokens) for g, _, t, turns, _ in samples]
        out = collate(r, np.stack([s[1] for s in samples]), [s[0] for s in samples], [s[4] for s in samples])
        return {"batch": out, "read": b + sum(skips.values()), "skips": skips, "converted": converted,
                "examples": examples}


class _Steps(torch.utils.data.Dataset):
    """Item `step` = this rank's batch of that step (DataLoader workers take whole batches in turn)."""

    def __init__(self, ds: MixDataset, batch_size: int, rank: int, world: int, start: int):
        self.ds, self.args, self.start = ds, (batch_size, rank, world), start

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict:
        return self.ds.batch(self.start + k, *self.args)


class MixStream:
    """The mixture as the trainer's stream: `batch(step, batch_size, rank, world)`, prefetched by workers."""

    def __init__(self, cfg, tok, layout):
        self.cfg = cfg
        self.ds = MixDataset(cfg, tok, layout)
        self.skips, self.converted, self.read, self.examples = self.ds.opening_skips(), Counter(), 0, {}
        self._it, self._next = None, None
        for reason, n in self.skips.items():
            log.warning("data: %d %s at opening", n, reason)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        if self.cfg.mix.workers == 0:
            got = self.ds.batch(step, batch_size, rank, world)
        else:
            if self._it is None or self._next != (step, batch_size, rank, world):  # (re)start at this step
                loader = torch.utils.data.DataLoader(
                    _Steps(self.ds, batch_size, rank, world, step), batch_size=None, shuffle=False,
                    num_workers=self.cfg.mix.workers, prefetch_factor=2, persistent_workers=False)
                self._it = iter(loader)
            got = next(self._it)
            self._next = (step + 1, batch_size, rank, world)
        self._account(got)
        return got["batch"]

    def _account(self, got: dict) -> None:
        self.read += got["read"]
        self.converted.update(got["converted"])
        for reason, n in got["skips"].items():
            if reason not in self.examples:
                log.warning("data: skipping %s samples, e.g. %s", reason, got["examples"][reason])
                self.examples[reason] = got["examples"][reason]
            self.skips[reason] += n
        bad = sum(self.skips.values())
        if self.read >= self.cfg.mix.min_checked and bad > self.cfg.mix.max_skip_frac * self.read:
            raise DataError(f"{bad} of {self.read} samples read were bad ({bad / self.read:.1%} > "
                            f"mix.max_skip_frac={self.cfg.mix.max_skip_frac}): {dict(self.skips)}; "
                            f"examples: {self.examples}")

    def log_stats(self) -> dict[str, int]:
        """Cumulative counts for log.jsonl: samples read, skipped per reason, images converted per mode."""
        return {"data_read": self.read, **{f"skip_{k}": v for k, v in sorted(self.skips.items())},
                **{k: v for k, v in sorted(self.converted.items())}}
