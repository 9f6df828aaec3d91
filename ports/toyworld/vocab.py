"""CLIP tokenizer files for a small closed vocabulary.

``write_clip_tokenizer(folder, words)`` writes what ``transformers.CLIPTokenizer.save_pretrained``
writes (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) for a
byte-level BPE whose symbols are the printable ASCII characters (alone and word-final, ``c</w>``) plus
one whole-word token per listed word, reached by a left-to-right merge chain
(``s t`` -> ``st``, ``st a`` -> ``sta``, ... , ``sta r</w>`` -> ``star</w>``). Listed words become
single tokens; any other word still tokenizes, into characters, so no prompt is refused.
"""

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
    merges: list[str] = []
    for word in words:
        left = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + "</w>" if i == len(word) - 1 else char
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            vocab.setdefault(merged, len(vocab))
            left = merged
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
