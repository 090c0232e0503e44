"""Generated images in the folder layouts that public text-to-image benchmarks read.

    repforce generate --ckpt runs/s3 --prompts geneval --metadata geneval/prompts/evaluation_metadata.jsonl --out runs/s3/geneval
    repforce generate --ckpt runs/s3 --prompts dpg --metadata ELLA/dpg_bench/prompts --out runs/s3/dpg

GenEval (djghosh13/geneval): one folder per line of `evaluation_metadata.jsonl`, numbered by
the line's place in the file, holding that line as `metadata.jsonl` and the samples:

    OUT/<line:05d>/metadata.jsonl        the line, as one JSON object
    OUT/<line:05d>/samples/<k:04d>.png   k = 0 .. n-1
    OUT/<line:05d>/grid.png              the samples tiled (optional for the scorer)

DPG-Bench (ELLA's dpg_bench): one image per prompt id, named `<id>.png`, its n <= 4 samples
tiled two to a row (2x2 for n = 4) in the order the scorer crops them (top-left, top-right,
bottom-left, bottom-right), each tile the model's image side. The scorer reads every entry
of OUT as an image, so nothing else is written there; score with
`PIC_NUM=n bash dpg_bench/dist_eval.sh OUT <side>`.

Image (prompt i, sample k) is drawn from its own stream, seeded seed + i * n + k, so an
export does not depend on the batch size it ran with.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .engine import Engine, GenOptions, InferenceError

DPG_MAX_SAMPLES = 4  # the DPG scorer crops at most four tiles (its --pic-num)


class ExportError(Exception):
    """Unusable benchmark metadata: one line naming the file (and line) at fault."""


@dataclass
class Prompt:
    key: str  # folder name (GenEval, the line's index) or image name (DPG, the prompt id)
    text: str  # what the model is asked to draw
    meta: dict | None  # GenEval: the metadata line, copied as it was; DPG: None
    where: str  # file (and line) it came from, for error messages


# ---------------------------------------------------------------------- reading


def read_geneval(path: str | Path) -> list[Prompt]:
    """The prompts of a GenEval `evaluation_metadata.jsonl`: one JSON object per line with a
    non-empty string `prompt` and a string `tag` (the scorer reads both). Blank lines are skipped;
    folder numbers count the other lines from 0, as GenEval's own generation script does."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no such metadata file: {path}")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(meta, dict):
            raise ExportError(f"{where}: not a JSON object")
        for field in ("prompt", "tag"):
            if not isinstance(meta.get(field), str) or not meta[field].strip():
                raise ExportError(f"{where}: no {field!r} string")
        out.append(Prompt(f"{len(out):05d}", meta["prompt"], meta, where))
    if not out:
        raise ExportError(f"{path}: no metadata lines")
    return out


def read_dpg(path: str | Path) -> list[Prompt]:
    """The prompts of DPG-Bench, from its prompts folder (`<id>.txt`, one prompt each) or from
    its `dpg_bench.csv` (columns item_id and text, one row per question: the first text of each
    id is kept). Sorted by id."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ExportError(f"{path}: no <id>.txt prompt files")
        rows = []
        for f in files:
            try:
                rows.append((f.stem, f.read_text(encoding="utf-8").strip(), str(f)))
            except UnicodeDecodeError:
                raise ExportError(f"{f}: not UTF-8 text") from None
    elif path.is_file() and path.suffix == ".csv":
        rows, seen = [], set()
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"item_id", "text"} <= set(reader.fieldnames or ()):
                raise ExportError(f"{path}: needs the columns item_id and text, has {reader.fieldnames}")
            for n, r in enumerate(reader, 2):
                if r["item_id"] not in seen:
                    seen.add(r["item_id"])
                    rows.append((r["item_id"], (r["text"] or "").strip(), f"{path}:{n}"))
        rows.sort()
    elif path.exists():
        raise ExportError(f"{path}: expected DPG-Bench's prompts folder or its dpg_bench.csv")
    else:
        raise ExportError(f"no such prompts folder or file: {path}")
    out = []
    for key, text, where in rows:
        # the scorer keys an image by its name up to the first dot
        if not key or "." in key or "/" in key:
            raise ExportError(f"{where}: prompt id {key!r} cannot name an image file the scorer can match")
        if not text:
            raise ExportError(f"{where}: empty prompt")
        out.append(Prompt(key, text, None, where))
    if not out:
        raise ExportError(f"{path}: no prompts")
    return out


def check(engine: Engine, prompts: list[Prompt]) -> None:
    """Every prompt fits the model's context, checked before any image is drawn."""
    for p in prompts:
        try:
            engine.check_prompts([p.text])
        except InferenceError as e:
            raise ExportError(f"{p.where}: {e}") from None


# ---------------------------------------------------------------------- writing


def tile(images: np.ndarray, cols: int) -> np.ndarray:
    """Images (n, H, W, 3) -> one (rows * H, cols * W, 3) array, row-major, empty tiles white."""
    n, H, W, C = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * H, cols * W, C), 255, dtype=images.dtype)
    for k, a in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = a
    return grid


def _generate(engine: Engine, prompts: list[Prompt], n: int, options: GenOptions | None, seed: int,
              batch_size: int, progress: bool, desc: str):
    """(i, the n images (n, H, W, 3) of prompt i), a few prompts per engine call."""
    per_batch = max(1, batch_size // n)
    for s in tqdm(range(0, len(prompts), per_batch), desc=desc, disable=not progress):
        chunk = prompts[s:s + per_batch]
        seeds = [seed + i * n + k for i in range(s, s + len(chunk)) for k in range(n)]
        arr, _ = engine.generate_arrays([p.text for p in chunk], n, seeds, options, batch_size=len(seeds))
        for j in range(len(chunk)):
            yield s + j, arr[j * n:(j + 1) * n]


def write_geneval(engine: Engine, prompts: list[Prompt], out: str | Path, n: int = 4,
                  options: GenOptions | None = None, seed: int = 0, batch_size: int = 64,
                  progress: bool = True) -> int:
    """GenEval's layout (module docstring) for the prompts of read_geneval; returns the image count."""
    out = Path(out)
    check(engine, prompts)
    for i, imgs in _generate(engine, prompts, n, options, seed, batch_size, progress, "geneval"):
        folder = out / prompts[i].key
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(prompts[i].meta) + "\n")
        for k, a in enumerate(imgs):
            Image.fromarray(a).save(folder / "samples" / f"{k:04d}.png")
        Image.fromarray(tile(imgs, math.ceil(math.sqrt(n)))).save(folder / "grid.png")
    return len(prompts) * n


def write_dpg(engine: Engine, prompts: list[Prompt], out: str | Path, n: int = 4,
              options: GenOptions | None = None, seed: int = 0, batch_size: int = 64,
              progress: bool = True) -> int:
    """DPG-Bench's layout (module docstring) for the prompts of read_dpg; returns the number of files."""
    if not 1 <= n <= DPG_MAX_SAMPLES:
        raise ExportError(f"DPG-Bench takes 1 to {DPG_MAX_SAMPLES} images per prompt, not {n}")
    out = Path(out)
    check(engine, prompts)
    out.mkdir(parents=True, exist_ok=True)
    for i, imgs in _generate(engine, prompts, n, options, seed, batch_size, progress, "dpg"):
        Image.fromarray(tile(imgs, 1 if n == 1 else 2)).save(out / f"{prompts[i].key}.png")
    return len(prompts)
