"""Fashion-MNIST as a second world: real photos nobody here made, with a learned judge.

    repforce fashion judge --out src/repforce/assets/fashion_judge   # train the judge (minutes)
    repforce train --preset shapes --variant pixel_rf --set data.world=fashion --out runs/fmnist_rf

The data are the original IDX files of Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist, gzipped or not; `data.fashion_root` moves it). Images
are 28x28 grayscale, white clothing on black; they are padded to the model's canvas and
replicated to RGB, or kept gray with `data.channels=1` (a one-channel model). Text comes
from the class names: "a photo of a sneaker" for generation, "what is this?" -> "sneaker"
and "describe the image." -> "a photo of a sneaker" for understanding.

Two-item composites (`data.fashion_pairs`, the share of samples that are composites; 0 by
default): two items of different classes, each shrunk to half the canvas side, side by
side: "a bag to the left of a sandal", "what is on the left?" -> "bag". The judge reads
each half separately (shrunk item back to judge size); a composite scores when both items
are the prompted classes in the prompted order. Its accuracy on real composites of the
test split is the ceiling of that score.

The judge is a small CNN trained on the train split only; its test-split accuracy is
recorded beside its weights with a version and a sha256. A generated image scores when
the judge sees the prompted class; the Frechet distance between the judge's penultimate
features of generated and held-out real images is this world's FID. It is NOT
comparable to Inception FID: other network, other features, other data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..sequence import CAPTION_QUESTION, Sample, guidance_drops

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
JUDGE_VERSION = "fashion-judge-v1"
PAIR_JUDGE_VERSION = "fashion-pair-judge-v1"  # the judge of half-size items (composites)
ASSETS = Path(__file__).parent.parent / "assets"
JUDGE_DIR, PAIR_JUDGE_DIR = ASSETS / "fashion_judge", ASSETS / "fashion_pair_judge"  # shipped judges
QUESTION = "what is this?"
PAIR_QUESTIONS = ("what is on the left?", "what is on the right?")


class FashionDataError(Exception):
    """Missing or malformed Fashion-MNIST files: one line naming the file and the problem."""


def _open(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise FashionDataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or plain) as a uint8 array, its header checked against its size."""
    path = Path(path)
    data = _open(path)
    if len(data) < 4:
        raise FashionDataError(f"{path}: truncated (no IDX header)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise FashionDataError(f"{path}: wrong magic {data[:4].hex()} (expected 00000801 labels or 00000803 images)")
    if len(data) < 4 + 4 * ndim:
        raise FashionDataError(f"{path}: truncated header")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    need = int(np.prod(shape))
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise FashionDataError(f"{path}: truncated: header says {shape} ({need} bytes), file has {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def find(root: Path, name: str) -> Path:
    for cand in (root / name, root / (name + ".gz")):
        if cand.exists():
            return cand
    raise FashionDataError(f"Fashion-MNIST file {name}(.gz) not found in {root}: install Debian's package "
                           f"`apt-get install dataset-fashion-mnist` or point data.fashion_root at the IDX files")


_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def load_split(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the train or test split."""
    if split not in FILES:
        raise ValueError(f"split must be train or test, got {split!r}")
    key = (str(root), split)
    if key not in _CACHE:
        root = Path(root)
        imgs, labels = (read_idx(find(root, f)) for f in FILES[split])
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise FashionDataError(f"{root}: {split} images {imgs.shape} and labels {labels.shape} do not match")
        if labels.max() >= len(CLASSES):
            raise FashionDataError(f"{root}: {split} labels go up to {labels.max()}, expected < {len(CLASSES)}")
        _CACHE[key] = (imgs, labels)
    return _CACHE[key]


def available(root: str | Path = DEFAULT_ROOT) -> bool:
    try:
        load_split("test", root)
        return True
    except FashionDataError:
        return False


def to_canvas(img: np.ndarray, canvas: int = 32, rgb: bool = True) -> np.ndarray:
    """28x28 -> canvas x canvas (zero-padded, centered; resized if the canvas is smaller), RGB by replication."""
    if canvas >= img.shape[0]:
        p = (canvas - img.shape[0]) // 2
        out = np.zeros((canvas, canvas), np.uint8)
        out[p:p + img.shape[0], p:p + img.shape[1]] = img
    else:

        out = np.asarray(Image.fromarray(img).resize((canvas, canvas), Image.BICUBIC))
    return _channels(out, rgb)


def _channels(gray: np.ndarray, rgb: bool) -> np.ndarray:
    """(H, W) gray -> (H, W, 3) replicated, or (H, W, 1)."""
    return np.repeat(gray[..., None], 3, axis=2) if rgb else gray[..., None]


def pair_canvas(a: np.ndarray, b: np.ndarray, canvas: int = 32, rgb: bool = True) -> np.ndarray:
    """Two 28x28 items side by side on one canvas, each shrunk to canvas/2 and centered vertically."""

    h = canvas // 2
    out = np.zeros((canvas, canvas), np.uint8)
    for k, img in enumerate((a, b)):
        out[h // 2:h // 2 + h, k * h:(k + 1) * h] = np.asarray(Image.fromarray(img).resize((h, h), Image.LANCZOS))
    return _channels(out, rgb)


def half_item(img: np.ndarray, h: int) -> np.ndarray:
    """A 28x28 item as the pair judge sees it in a composite: shrunk to h x h, grown back to 28 x 28."""

    return np.asarray(Image.fromarray(img).resize((h, h), Image.LANCZOS).resize((28, 28), Image.BICUBIC))


def pair_halves(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right items of composites (N, C, C[, 3]) as judge-sized canvases (N, 32, 32)."""

    x = np.asarray(images)
    x = x.mean(-1).round().astype(np.uint8) if x.ndim == 4 else x
    h = x.shape[1] // 2
    grow = lambda im: np.asarray(Image.fromarray(im).resize((28, 28), Image.BICUBIC))  # noqa: E731
    side = [np.stack([to_canvas(grow(im[h // 2:h // 2 + h, k * h:(k + 1) * h]), 32, rgb=False)[..., 0] for im in x])
            for k in (0, 1)]
    return side[0], side[1]


def pair_caption(left: int, right: int) -> str:
    a, b = CLASSES[left], CLASSES[right]
    return f"{article(a)} {a} to the left of {article(b)} {b}"


def pair_prompts(n: int = 20, seed: int = 0) -> list[tuple[int, int]]:
    """A fixed, seeded set of n ordered class pairs (distinct classes) for evaluation."""
    pairs = [(i, j) for i in range(len(CLASSES)) for j in range(len(CLASSES)) if i != j]
    pick = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[k] for k in sorted(pick)]


def score_pairs(images: np.ndarray, pairs: np.ndarray, judge: "Judge") -> dict:
    """Composites (N, C, C[, 3]) against their prompted (left, right) classes (N, 2): both items
    right in the right order; each item alone; and the share drawn in swapped order."""
    left, right = pair_halves(images)
    pl, _ = predict(judge, left)
    pr, _ = predict(judge, right)
    pairs = np.asarray(pairs)
    return {"pair_accuracy": float(((pl == pairs[:, 0]) & (pr == pairs[:, 1])).mean()),
            "item_accuracy": float(((pl == pairs[:, 0]).mean() + (pr == pairs[:, 1]).mean()) / 2),
            "swapped": float(((pl == pairs[:, 1]) & (pr == pairs[:, 0])).mean()), "n": int(len(pairs))}


def pair_ceiling(judge: "Judge", root: str | Path = DEFAULT_ROOT, n: int = 1000, canvas: int = 32,
                 seed: int = 0) -> dict:
    """score_pairs on n real composites of the test split: the best a generator can score."""
    x, y = load_split("test", root)
    rng = np.random.default_rng(seed)
    i = rng.integers(len(x), size=4 * n)
    j = rng.integers(len(x), size=4 * n)
    keep = np.flatnonzero(y[i] != y[j])[:n]
    imgs = np.stack([pair_canvas(x[a], x[b], canvas, rgb=False)[..., 0] for a, b in zip(i[keep], j[keep])])
    return score_pairs(imgs, np.stack([y[i[keep]], y[j[keep]]], 1), judge)


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def caption(label: int) -> str:
    name = CLASSES[label]
    return f"a photo of {article(name)} {name}"


def prompts() -> list[str]:
    return [caption(k) for k in range(len(CLASSES))]


def corpus() -> list[str]:
    return prompts() + [QUESTION] + list(CLASSES)


def sample(cfg, j: int, gen_fraction: float):
    """Sample j of a run's Fashion-MNIST stream (train split only), as a sequence.Sample."""

    rng = np.random.default_rng([cfg.seed, j, 1])
    imgs, labels = load_split("train", cfg.fashion_root)
    i = int(rng.integers(len(imgs)))
    rgb = cfg.channels == 3
    image, label = to_canvas(imgs[i], cfg.canvas, rgb), int(labels[i])
    if cfg.fashion_pairs > 0 and rng.random() < cfg.fashion_pairs:  # no extra draw when off: streams unchanged
        k = int(rng.integers(len(imgs)))
        while labels[k] == label:
            k = int(rng.integers(len(imgs)))
        image, right = pair_canvas(imgs[i], imgs[k], cfg.canvas, rgb), int(labels[k])
        if rng.random() < gen_fraction:
            drop_text, drop_rep = guidance_drops(cfg, rng)
            return Sample(True, image, "" if drop_text else pair_caption(label, right), "", drop_rep)
        if rng.random() < cfg.caption_fraction:
            return Sample(False, image, CAPTION_QUESTION, pair_caption(label, right))
        side = int(rng.integers(2))
        return Sample(False, image, PAIR_QUESTIONS[side], CLASSES[(label, right)[side]])
    if rng.random() < gen_fraction:
        drop_text, drop_rep = guidance_drops(cfg, rng)
        return Sample(True, image, "" if drop_text else caption(label), "", drop_rep)
    if rng.random() < cfg.caption_fraction:
        return Sample(False, image, CAPTION_QUESTION, caption(label))
    return Sample(False, image, QUESTION, CLASSES[label])


# ----------------------------------------------------------------------------- the judge


class Judge(nn.Module):
    """A small CNN classifier of 32x32 grayscale clothing; `features` is its penultimate layer."""

    def __init__(self, width: int = 16, feat: int = 128):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w, feat), nn.ReLU())
        self.head = nn.Linear(feat, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 32, 32) in [-1, 1] -> (B, feat)
        return self.fc(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


def judge_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, 3) at any canvas -> (N, 1, 32, 32) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images)).float()
    if x.dim() == 4:
        x = x.mean(-1)  # RGB -> gray
    x = x[:, None] / 127.5 - 1
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x


def _batches(n: int, bs: int, rng: np.random.Generator | None = None):
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, bs):
        yield idx[s:s + bs]


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, bs: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(class predictions (N,), penultimate features (N, feat)) of uint8 images."""
    judge.eval()
    preds, feats = [], []
    for b in _batches(len(images), bs):
        f = judge.features(judge_input(images[b]))
        feats.append(f.numpy())
        preds.append(judge.head(f).argmax(-1).numpy())
    return np.concatenate(preds), np.concatenate(feats)


def train_judge(out: str | Path, root: str | Path = DEFAULT_ROOT, epochs: int = 6, seed: int = 0,
                limit: int | None = None, progress: bool = True, item: int = 0) -> dict:
    """Train the judge on the train split only (random crops and flips), report test accuracy, save.

    item > 0 trains the pair judge: every image is first shrunk to item x item and grown back,
    as the items of a composite on a 2 * item canvas are read (`pair_halves`)."""

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = load_split("train", root)
    x_te, y_te = load_split("test", root)
    if limit:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    look = (lambda im: half_item(im, item)) if item else (lambda im: im)  # noqa: E731
    canvas = np.stack([to_canvas(look(im), 32, rgb=False)[..., 0] for im in x_tr])  # (N, 32, 32)
    judge = Judge()
    steps = epochs * ((len(canvas) + 127) // 128)
    opt = torch.optim.AdamW(judge.parameters(), lr=4e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    bar = tqdm(total=steps, disable=not progress, desc="judge")
    for _ in range(epochs):
        judge.train()
        for b in _batches(len(canvas), 128, rng):
            x = judge_input(canvas[b])
            dx, dy = rng.integers(-2, 3, 2)
            x = torch.roll(x, (int(dy), int(dx)), dims=(2, 3))
            if rng.random() < 0.5:
                x = x.flip(3)
            loss = F.cross_entropy(judge(x), torch.from_numpy(y_tr[b]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    test_imgs = np.stack([to_canvas(look(im), 32, rgb=False)[..., 0] for im in x_te])
    pred, _ = predict(judge, test_imgs)
    acc = float((pred == y_te).mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "judge.safetensors"
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(weights))
    meta = {"version": PAIR_JUDGE_VERSION if item else JUDGE_VERSION, "item": item, "test_accuracy": acc,
            "epochs": epochs, "seed": seed,
            "train_images": int(len(canvas)), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (out / "judge.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_judge(folder: str | Path = JUDGE_DIR) -> tuple[Judge, dict]:
    """The judge and its metadata; the weights' sha256 must match the recorded one.
    The pair judge (half-size items of composites) is in PAIR_JUDGE_DIR."""

    folder = Path(folder)
    weights, meta_path = folder / "judge.safetensors", folder / "judge.json"
    if not weights.exists() or not meta_path.exists():
        raise FashionDataError(f"no judge in {folder}: train one with `repforce fashion judge --out {folder}`")
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise FashionDataError(f"{weights}: sha256 {digest[:12]}... does not match judge.json ({meta['sha256'][:12]}...)")
    judge = Judge()
    judge.load_state_dict(load_file(str(weights)))
    return judge.eval(), meta


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D)."""
    from scipy import linalg  # heavy: only for the Frechet distance

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # with fewer images than feature dimensions s1 is singular and SciPy warns; the square root is still the
    # one every FID implementation takes. (`disp=False` is gone in SciPy 1.18; this form works in both.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def score_generated(images: np.ndarray, labels: np.ndarray, judge: Judge, root: str | Path = DEFAULT_ROOT,
                    n_real: int = 2000) -> dict:
    """Class accuracy of generated images against their prompted labels, and the Frechet
    distance of their judge features to n_real held-out (test split) real images."""
    pred, feats = predict(judge, images)
    x_te, _ = load_split("test", root)
    real = np.stack([to_canvas(im, 32, rgb=False)[..., 0] for im in x_te[-n_real:]])
    _, real_feats = predict(judge, real)
    per_class = {CLASSES[k]: float((pred[labels == k] == k).mean()) for k in range(len(CLASSES)) if (labels == k).any()}
    return {"class_accuracy": float((pred == labels).mean()), "frechet_distance": frechet_distance(feats, real_feats),
            "per_class": per_class, "n": int(len(images)), "n_real": n_real}
