"""CLIP tokenizer files for a small closed vocabulary.

``write_clip_tokenizer(folder, words)`` writes what ``transformers.CLIPTokenizer.save_pretrained``
writes (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) for
a byte-level BPE whose symbols are the printable ASCII characters (alone and word-final, ``c</w>``)
plus one whole-word token per listed word. Each word's merges are appended after every earlier
word's: the word is first split the way the merges so far would split it (BPE applies the
lowest-ranked pair first, so earlier chains run first), then those pieces are merged left to right
(``st a`` -> ``sta``, ..., ``sta r</w>`` -> ``star</w>``). An earlier word's chain never sees the
new merges (it is one token before they rank), so every listed word is one token; any other word
still tokenizes, into characters, so no prompt is refused.
"""

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], max_length: int = 77) -> int:
    """Write the four tokenizer files into ``folder``; return the vocabulary size.

    The special tokens are the last two ids (``BOS`` then ``EOS``, which is also the pad token), as
    in CLIP's own vocabulary.
    """
    # Printable ASCII maps to itself under CLIP's bytes_to_unicode: valid byte-level symbols.
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(word, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            left += right
            vocab.setdefault(left, len(vocab))
        if _bpe(word, ranks) != [word + "</w>"]:  # e.g. a word whose pieces repeat a merged pair
            raise ValueError(f"cannot make {word!r} a single BPE token after {list(ranks)[-1]}")
    merges = [f"{a} {b}" for a, b in ranks]
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return len(vocab)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word (``CLIPTokenizer.bpe``): merge the lowest-ranked adjacent
    pair until none is left."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pair = pieces[i], pieces[i + 1]
        merged, j = [], 0
        while j < len(pieces):  # every occurrence of the pair, left to right, as CLIP does
            if j < len(pieces) - 1 and (pieces[j], pieces[j + 1]) == pair:
                merged.append(pieces[j] + pieces[j + 1])
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces
