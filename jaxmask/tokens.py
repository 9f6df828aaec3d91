"""Class-token lookup: where a class name's sub-tokens sit in a prompt's token ids.

DAAM-style sub-sequence matching (``daam/utils.py: compute_token_merge_indices``): every
occurrence of the class's BPE sequence counts, and a class map is the mean of the maps of
all the positions it covers. It covers multi-token names ("potted plant", "tv monitor")
without the per-class offsets of SeeDiff's and Dataset Diffusion's code.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

#: A prompt's token ids on the host: a list, or a row of the tokenizer's numpy output.
TokenIds = Sequence[int] | Int[np.ndarray, " t"]


def token_positions(prompt_ids: TokenIds, class_ids: Sequence[int]) -> list[int]:
    """Positions in ``prompt_ids`` covered by every occurrence of ``class_ids`` (host side).

    Args:
      prompt_ids: the prompt's token ids, BOS/EOS/padding included (length ``t``).
      class_ids: the class name's token ids, without BOS/EOS.

    Returns:
      Sorted positions; empty when the class does not occur (the caller decides whether that
      is an error; ``class_token_weights`` raises).

    >>> token_positions([49406, 320, 2870, 3914, 49407], [2870, 3914])
    [2, 3]
    """
    prompt_ids, class_ids = list(prompt_ids), list(class_ids)
    m = len(class_ids)
    if m == 0:
        raise ValueError("class_ids is empty: tokenize the class name without BOS/EOS")
    hits = set()
    for i in range(len(prompt_ids) - m + 1):
        if prompt_ids[i : i + m] == class_ids:
            hits.update(range(i, i + m))
    return sorted(hits)


def class_token_weights(
    prompt_ids: TokenIds, classes: Sequence[Sequence[int]], names: Sequence[str] | None = None
) -> Float[np.ndarray, "k t"]:
    """Averaging weights ``(k, t)``: row ``c`` is ``1/|P_c|`` on class ``c``'s positions ``P_c``.

    A class map is then ``einsum("...t,kt->k...", maps, weights)``: the mean over all its
    positions (DAAM ``compute_word_heat_map``).

    Raises:
      ValueError: when a class's tokens are not in the prompt; the message names the class.
    """
    t = len(prompt_ids)
    weights = np.zeros((len(classes), t), np.float32)
    for c, class_ids in enumerate(classes):
        pos = token_positions(prompt_ids, class_ids)
        if not pos:
            name = names[c] if names is not None else f"class {c} (token ids {list(class_ids)})"
            raise ValueError(
                f"{name!r} does not occur in the prompt's tokens; write the class word into the "
                "prompt (e.g. 'a photo of a {class}') or pass the word the prompt uses"
            )
        weights[c, pos] = 1.0 / len(pos)
    return weights


def match_tokens(prompt_ids: Int[Array, " t"], class_ids: Int[Array, " m"]) -> Bool[Array, " t"]:
    """Traceable twin of ``token_positions``: a mask of the covered positions.

    ``m`` is static (the class's token count); vmap over prompts for a batch. A class that does
    not occur gives an all-False mask (and, through ``weights_from_matches``, an empty mask).
    """
    t, m = prompt_ids.shape[0], class_ids.shape[0]
    if m > t:
        raise ValueError(f"class has {m} tokens, more than the prompt's {t}")
    starts = jnp.arange(t - m + 1)
    windows = prompt_ids[starts[:, None] + jnp.arange(m)[None, :]]  # (t-m+1, m)
    start_hit = jnp.all(windows == class_ids[None, :], axis=1)
    covered = jnp.zeros(t, bool)
    for j in range(m):  # m is a handful of BPE pieces: unrolled at trace time
        covered = covered.at[starts + j].max(start_hit)
    return covered


def weights_from_matches(matches: Bool[Array, "k t"]) -> Float[Array, "k t"]:
    """Row-normalise match masks into averaging weights; a row with no match stays zero."""
    hits = matches.astype(jnp.float32)
    counts = jnp.sum(hits, axis=-1, keepdims=True)
    return jnp.where(counts > 0, hits / jnp.maximum(counts, 1.0), 0.0)
