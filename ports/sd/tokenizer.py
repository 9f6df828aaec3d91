"""Prompts to CLIP token ids the way Stable Diffusion's pipeline makes them, and class-name tokens.

Both functions take the checkpoint's transformers ``CLIPTokenizer`` (``load(...).tokenizer``).
"""

import warnings
from collections.abc import Sequence

import numpy as np

# A tokenizer_config.json without model_max_length gives transformers' "very large" sentinel.
_MAX_SANE_LENGTH = 4096


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids for the text encoder: ``[BOS, tokens..., EOS, PAD...]``, ``int32 (b, 77)``.

    Padding uses the tokenizer's own pad token, as SD's pipeline does (SD 1.x pads with
    ``<|endoftext|>``, SD 2.x with ``!``), so the text embeddings match the pipeline's.

    .. warning::
       A prompt longer than the text encoder's ``model_max_length`` (77 with BOS and EOS, so 75 word
       tokens) is truncated like SD's pipeline does it: its first 75 tokens are kept and EOS is put
       last. A ``UserWarning`` names the prompt and how many tokens were dropped; class names in the
       dropped part get no attention maps.

    Args:
      tokenizer: a transformers ``CLIPTokenizer``.
      prompts: ``b`` prompts.

    Returns:
      ``np.ndarray`` of ``int32``, shape ``(b, model_max_length)``.

    Example::

        tokenize(sd.tokenizer, ["a photo of a cat"])[0, :7]
        # SD 1.x: [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts must be a list of strings, got the string {prompts!r}; wrap it: [prompt]"
        )
    max_length = _max_length(tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    ids = np.full((len(prompts), max_length), pad, dtype=np.int32)
    for i, prompt in enumerate(prompts):
        words = _word_ids(tokenizer, prompt)
        keep = max_length - 2
        if len(words) > keep:
            warnings.warn(
                f"prompt {prompt!r} is {len(words) + 2} tokens long, over the text encoder's "
                f"{max_length}: truncated, {len(words) - keep} tokens dropped",
                UserWarning,
                stacklevel=2,
            )
            words = words[:keep]
        row = [bos, *words, eos]
        ids[i, : len(row)] = row
    return ids


def class_ids(tokenizer, name: str) -> list[int]:
    """The token ids of a class name as it appears inside a prompt, without BOS/EOS.

    A name can be several tokens (``"potted plant"``, or a rare word split into pieces); the core
    finds this sub-sequence in the prompt's ids (``jaxmask.tokens``).

    Example::

        class_ids(sd.tokenizer, "cat")  # SD 1.x: [2368]
    """
    ids = _word_ids(tokenizer, name)
    if not ids:
        raise ValueError(f"class name {name!r} has no tokens; give a non-empty name such as 'cat'")
    special = {tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    special |= {tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set()
    if special & set(ids):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"class name {name!r} is not in the tokenizer's vocabulary: it tokenizes to {pieces}, "
            "which holds unknown, padding or start/end tokens whose attention is not the class's; "
            "use a word the model's tokenizer has"
        )
    return ids


def _word_ids(tokenizer, text: str) -> list[int]:
    return [
        int(i) for i in tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    ]


def _max_length(tokenizer) -> int:
    max_length = int(tokenizer.model_max_length)
    if not 2 < max_length <= _MAX_SANE_LENGTH:
        raise ValueError(
            f"the tokenizer's model_max_length is {tokenizer.model_max_length}; SD's is 77. "
            'Fix: set "model_max_length": 77 in the checkpoint\'s tokenizer/tokenizer_config.json'
        )
    return max_length
