import json

import pytest

from repforce import tokenizer as T
from repforce.data import build_world_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_world_tokenizer(d, n_scenes=500)
    return d


def test_round_trip_and_reload(tok_dir):
    tok = T.load_tokenizer(tok_dir)
    for text in ["two small red circles and a large blue square", "what shape is left of the red circle?",
                 "how many triangles are there?", "a cyan triangle below a purple square"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) <= len(text.split()) + 2  # words are whole tokens after BPE
    ids = {tok.pad_id, tok.bos_id, tok.eos_id, tok.img_start_id, tok.img_end_id, tok.boi_id, tok.eoi_id}
    assert len(ids) == 7
    assert tok.decode([tok.bos_id, *tok.encode("a red circle"), tok.eos_id]) == "a red circle"


def test_deterministic(tmp_path, tok_dir):
    build_world_tokenizer(tmp_path, n_scenes=500)
    a = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    b = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert a == b


def test_loads_with_autotokenizer(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert hf.convert_tokens_to_ids("<|boi|>") == T.load_tokenizer(tok_dir).boi_id


def test_foreign_tokenizer_gets_specials(tmp_path):
    # An LLM-style tokenizer: its own eos, no bos/pad, none of our image markers.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", "a", "red", "circle", "Ġred", "Ġcircle"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>")
    hf.save_pretrained(str(tmp_path))
    tok = T.load_tokenizer(tmp_path)
    assert tok.eos_id == 1  # kept its own
    assert len(tok) == 7 + 6  # pad, bos and the four image markers added
    assert tok.encode("a red circle") == [2, 3, 4]


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        T.load_tokenizer("/nonexistent/tok")
