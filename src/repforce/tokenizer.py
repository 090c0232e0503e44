"""Text tokenizer: a BPE trained on a corpus (the worlds' text), or any local Hugging Face one.

    from repforce.tokenizer import load_tokenizer, train_tokenizer
    train_tokenizer("runs/tok", corpus); tok = load_tokenizer("runs/tok")
    repforce.data.build_world_tokenizer("runs/tok")      # the BPE of the small worlds

Either way the model sees one `Tokenizer` with the special tokens it needs: pad, bos, eos,
image start/end (around image-encoder tokens) and BOI/EOI (around a generated image).
Missing ones are added to a foreign tokenizer (the caller then resizes embeddings to
`len(tok)`). Nothing is ever downloaded: paths must be local folders.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = {  # role -> token string
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "img_start": "<|img_start|>",
    "img_end": "<|img_end|>",
    "boi": "<|boi|>",
    "eoi": "<|eoi|>",
}


class Tokenizer:
    """A Hugging Face fast tokenizer plus the ids of the special tokens the model uses.

    pad/bos/eos are whatever the tokenizer itself names them (an LLM keeps its own);
    the image markers are ours, looked up by text."""

    def __init__(self, hf):
        self.hf = hf
        tid = hf.convert_tokens_to_ids
        roles = {"pad": hf.pad_token, "bos": hf.bos_token, "eos": hf.eos_token}
        roles.update({r: SPECIALS[r] for r in ("img_start", "img_end", "boi", "eoi")})
        ids = {}
        for role, text in roles.items():
            if text is None or tid(text) is None or tid(text) == hf.unk_token_id:
                raise ValueError(f"tokenizer has no {role} token ({text!r})")
            ids[role] = tid(text)
        if len({v for r, v in ids.items() if r != "pad"}) < 6:  # pad may equal eos (common in LLMs): pads are masked
            raise ValueError(f"special token ids collide: {ids}")
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.img_start_id, self.img_end_id = ids["img_start"], ids["img_end"]
        self.boi_id, self.eoi_id = ids["boi"], ids["eoi"]

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))


def train_tokenizer(out: str | Path, corpus: list[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on `corpus` and save it as a transformers folder.

    Deterministic: BPE training is ordered, so the same corpus gives the same vocabulary."""
    from transformers import PreTrainedTokenizerFast  # heavy: off the import path

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=SPECIALS["pad"], bos_token=SPECIALS["bos"],
                                 eos_token=SPECIALS["eos"], unk_token=None,
                                 additional_special_tokens=[SPECIALS[k] for k in ("img_start", "img_end", "boi", "eoi")])
    tok = Tokenizer(hf)
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save(out)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a local tokenizer folder (ours or any Hugging Face one, e.g. an LLM's), adding
    whichever of our special tokens it lacks. Never downloads."""
    from transformers import AutoTokenizer  # heavy: off the import path

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add: dict = {f"{r}_token": SPECIALS[r] for r in ("pad", "bos", "eos") if getattr(hf, f"{r}_token") is None}
    vocab = hf.get_vocab()
    extra = [SPECIALS[r] for r in ("img_start", "img_end", "boi", "eoi") if SPECIALS[r] not in vocab]
    if add:
        hf.add_special_tokens(add)
    if extra:
        hf.add_tokens(extra, special_tokens=True)
    return Tokenizer(hf)
