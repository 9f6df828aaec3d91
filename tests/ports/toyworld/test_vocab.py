"""The closed-vocabulary CLIP tokenizer writer, read back by transformers' CLIPTokenizer."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from ports.toyworld import train
from ports.toyworld.vocab import BOS, EOS, _bpe, write_clip_tokenizer

# Words whose left-to-right merge chains collide (shared pairs in other positions: "re" of
# "red" inside "green", "ed" of "red" ending "striped", ...), the case a naive writer splits.
HARD = ["red", "green", "reed", "agreed", "striped", "checkered", "background", "a", "an", "ground"]


@pytest.fixture(scope="module", params=["world", "hard"])
def written(request, tmp_path_factory):
    words = list(train.WORDS) if request.param == "world" else HARD
    folder = tmp_path_factory.mktemp(request.param)
    size = write_clip_tokenizer(folder, words)
    return words, size, CLIPTokenizer.from_pretrained(folder), folder


def test_every_listed_word_is_one_token(written):
    words, size, tokenizer, _ = written
    assert len(tokenizer) == size
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
        ids = tokenizer(word)["input_ids"]
        assert ids == [size - 2, tokenizer.convert_tokens_to_ids(word + "</w>"), size - 1]
    assert tokenizer.convert_ids_to_tokens([size - 2, size - 1]) == [BOS, EOS]


def test_other_words_still_tokenize_into_known_pieces(written):
    words, _, tokenizer, _ = written
    for text in ["zebra", "a reddish greenery", "x9!"]:
        pieces = tokenizer.tokenize(text)
        assert tokenizer.unk_token not in pieces
        assert "".join(pieces).replace("</w>", "") == text.replace(" ", "")


def test_bpe_simulation_matches_clip_tokenizer(written):
    """The writer's own BPE (which decides the merges) splits any word as CLIPTokenizer does."""
    words, _, tokenizer, folder = written
    lines = (folder / "merges.txt").read_text().splitlines()[1:]  # after "#version"
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    rng = np.random.default_rng(0)
    letters = sorted(set("".join(words)))
    samples = [*words, *("".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(200))]
    for word in samples:
        assert _bpe(word, ranks) == tokenizer.tokenize(word), word
