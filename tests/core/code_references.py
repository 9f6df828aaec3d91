"""Independent replays of the released code paths, in numpy + OpenCV (and PyTorch where the code
uses it), and random structured scenes to feed them and jaxmask alike.

Written from the released code's semantics (BAIKLAB-Admin/SeeDiff ``seediff_app.py``,
weijiawu/DiffuMask ``parallel_generate_VOC_Attention_AnyClass.py``, VinAIResearch/Dataset-Diffusion
``gen_data.py``), not from jaxmask: per-head maps in, the code's own reductions (head sums,
``torch.var``, ``cv2.resize(INTER_CUBIC)``, ``cv2.threshold(uint16, THRESH_OTSU)``,
``F.interpolate``, ``torch.matrix_power``) applied step by step. The one liberty: a sum of cosine
similarities over seeds is computed as one product with the sum of the seeds' unit rows (the same
number as the code's per-seed loop, at ``n^2`` instead of ``|S| n^2`` work), in float64.

A scene holds per-layer, per-head attention probabilities (softmax over keys) of a few
elliptical objects: cross-attention at every side whose class tokens light up their object
(strong layers, weak layers whose head sum varies by ~1e-3, flat layers), self-attention that
prefers nearby pixels of the same object. ``jaxmask_maps`` gives jaxmask what its capture
gives: the mean over heads, with the head count in the ``Layout``.
"""

import dataclasses

import cv2
import jax.numpy as jnp
import numpy as np

import jaxmask

BOS_LOGIT = 3.0


@dataclasses.dataclass
class Scene:
    sides: tuple[int, ...]  # ascending; seeds at sides[0] for SeeDiff
    labels: dict[int, np.ndarray]  # {r: (r, r)} 0 background, j + 1 inside object j
    cross: dict[int, np.ndarray]  # {r: (l, heads, r, r, t)} probabilities over t tokens
    self_attn: dict[int, np.ndarray]  # {r: (l, heads, n, n)}; layer 0 is the first up layer
    layer_kinds: tuple[str, ...]  # kind of each cross layer at sides[0]
    beta: float


def _object_labels(centres, radii, r: int) -> np.ndarray:
    y, x = (np.mgrid[:r, :r] + 0.5) / r
    labels = np.zeros((r, r), np.int32)
    for j, ((cy, cx), (ry, rx)) in enumerate(zip(centres, radii, strict=True)):
        labels[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = j + 1
    return labels


def _softness(centres, radii, r: int) -> np.ndarray:
    """(objects, r, r) smooth indicators: 1 inside, falling off over ~10 % of a radius."""
    y, x = (np.mgrid[:r, :r] + 0.5) / r
    out = []
    for (cy, cx), (ry, rx) in zip(centres, radii, strict=True):
        d = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
        out.append(1.0 / (1.0 + np.exp((d - 1.0) / 0.1)))
    return np.stack(out)


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e.astype(np.float32, copy=False)


def make_scene(
    seed: int,
    sides=(16, 32, 64),
    objects: int = 3,
    tokens: int = 8,
    layers: int = 5,
    heads: int = 8,
    self_heads: int = 2,
    self_layers: int = 1,
    with_self: bool = True,
) -> Scene:
    """A random scene: ``objects`` ellipses, object ``j`` at token ``j + 1`` (token 0 is BOS).

    Cross layers at the seed side are a mix of ``strong`` (class logits +2..+4 inside the
    object), ``weak`` (+0.1..+0.6: a head sum whose variance is ~1e-4..1e-2, which the code
    keeps and a head-mean guard would mute) and ``flat`` (<= +0.03: muted by the code); at least
    one of each in every scene. Every head has its own strengths and logit noise.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.25, 0.75, (objects, 2))
    radii = rng.uniform(0.1, 0.28, (objects, 2))
    kinds = ["strong", "weak", "flat"] + list(rng.choice(["strong", "weak", "flat"], layers - 3))
    kinds = tuple(rng.permutation(kinds))
    labels, cross, self_attn = {}, {}, {}
    for i, r in enumerate(sides):
        labels[r] = _object_labels(centres, radii, r)
        soft = _softness(centres, radii, r)  # (objects, r, r)
        per_layer = []
        for layer in range(layers):
            kind = kinds[layer] if i == 0 else "strong"
            lo, hi = {"strong": (2.0, 4.0), "weak": (0.1, 0.6), "flat": (0.0, 0.03)}[kind]
            noise = {"strong": 0.3, "weak": 0.05, "flat": 0.02}[kind]
            logits = np.zeros((heads, r, r, tokens))
            logits[..., 0] = BOS_LOGIT
            strength = rng.uniform(lo, hi, (heads, objects))
            logits[..., 1 : objects + 1] += np.einsum("ho,oij->hijo", strength, soft)
            logits += noise * rng.standard_normal(logits.shape)
            per_layer.append(_softmax(logits, -1))
        cross[r] = np.stack(per_layer)
        if not with_self:
            continue
        # self-attention: near pixels of the same object (or of the background)
        centre = ((np.arange(r) + 0.5) / r).astype(np.float32)
        py, px = np.repeat(centre, r), np.tile(centre, r)
        d2 = np.subtract.outer(py, py) ** 2
        d2 += np.subtract.outer(px, px) ** 2
        flat = labels[r].reshape(-1)
        same = np.equal.outer(flat, flat).astype(np.float32)
        n = r * r
        sa = np.empty((self_layers, self_heads, n, n), np.float32)
        for layer in range(self_layers):
            for h in range(self_heads):
                sigma = rng.uniform(0.08, 0.2)
                logits = rng.random((n, n), dtype=np.float32)  # uniform noise, std 0.3
                logits -= np.float32(0.5)
                logits *= np.float32(0.3 * np.sqrt(12))
                logits -= d2 * np.float32(1 / (2 * sigma**2))
                logits += np.float32(rng.uniform(1.5, 3.0)) * same
                logits -= logits.max(axis=1, keepdims=True)
                np.exp(logits, out=logits)
                logits /= logits.sum(axis=1, keepdims=True)
                sa[layer, h] = logits
        self_attn[r] = sa
    beta = 0.3 if seed % 2 == 0 else 0.5
    return Scene(tuple(sides), labels, cross, self_attn, kinds, beta)


def jaxmask_maps(scene: Scene, self_layers: str, cross_sides=None) -> jaxmask.AttentionMaps:
    """What jaxmask's capture holds: head means (float32), layers kept for cross-attention;
    self-attention of the first up layer (layer 0) or the mean over layers."""
    cross_sides = scene.sides if cross_sides is None else cross_sides
    cross = {r: jnp.asarray(scene.cross[r].mean(axis=1)) for r in cross_sides}
    if self_layers == "first_up":
        self_attn = {r: jnp.asarray(a[0].mean(axis=0)) for r, a in scene.self_attn.items()}
    else:
        self_attn = {r: jnp.asarray(a.mean(axis=(0, 1))) for r, a in scene.self_attn.items()}
    heads = scene.cross[scene.sides[0]].shape[1]
    layout = jaxmask.Layout(scene.sides, first_up=scene.sides, heads=(heads,) * len(scene.sides))
    return jaxmask.AttentionMaps(
        cross=cross,
        self_attn=self_attn,
        self_layers=self_layers,
        resolutions=scene.sides,
        layout=layout,
    )


# --- the released code paths -----------------------------------------------------------------


def _minmax(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / (m.max() - m.min())


def _otsu_foreground(m: np.ndarray) -> np.ndarray:
    """``cv2.threshold((m*m*255).astype(np.uint16), 0, 255, BINARY + OTSU)`` > 0."""
    levels = ((m * m) * np.float32(255)).astype(np.uint16)
    _, mask = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.reshape(-1) > 0


def _cosine_sum(self_attn: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``sum_s torch.nn.CosineSimilarity(dim=1)(SA, SA[s])`` over the seed rows ``s``."""
    sa = self_attn.astype(np.float64)
    norms = np.linalg.norm(sa, axis=1)
    unit = sa / np.maximum(norms, 1e-8)[:, None]
    return (unit @ unit[seeds].sum(axis=0)).astype(np.float32)


def seediff_code(scene: Scene, token: int, size: int = 512):
    """SeeDiff ``seediff_app.py: save_cross_attention`` / ``aggregate_attention``.

    Returns ``(soft (size, size), mask (size, size) bool)``: the min-max of the bicubic 64 map
    at ``size``, and it thresholded ``> beta``.
    """
    r0 = scene.sides[0]
    # step 1: per layer at r0, the head sum of the class token's map; min-max; x0.01 when
    # torch's (unbiased) variance is <= 1e-4
    out_cross_norm = []
    for layer in scene.cross[r0]:
        head_sum = layer[..., token].sum(axis=0)
        norm = _minmax(head_sum)
        if not head_sum.var(ddof=1) > 1e-4:
            norm = norm * np.float32(0.01)
        out_cross_norm.append(norm)
    # step 2: seeds = Otsu foreground of minmax(sum)^2
    ca_map = _minmax(np.sum(out_cross_norm, axis=0))
    seeds = _otsu_foreground(ca_map)
    # step 3: cosine expansion with the first up layer's self-attention, heads summed
    sa = scene.self_attn[r0][0].sum(axis=0)
    m = _minmax(_cosine_sum(sa, seeds)).reshape(r0, r0)
    # steps 4-5: bicubic up, background seeds below Otsu, M = minmax(minmax(1 - B) minmax(init))
    for r in scene.sides[1:]:
        init = cv2.resize(m, (r, r), interpolation=cv2.INTER_CUBIC)
        background = ~_otsu_foreground(init)
        sa = scene.self_attn[r][0].sum(axis=0)
        vis = _minmax(1 - _cosine_sum(sa, background)).reshape(r, r)
        m = _minmax(_minmax(init) * vis)
    # step 7: bicubic to the image, min-max, > beta
    soft = _minmax(cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC))
    return soft, soft > scene.beta


def diffumask_ca(scene: Scene, class_tokens: list[list[int]], size: int = 512):
    """DiffuMask ``save_cross_attention``: per side, the mean over layers x
    heads; per token, ``cv2.resize`` to the image and ``/ max``; mean over sides, then over
    the class's tokens. Returns ``(k, size, size)`` soft maps (unclipped)."""
    per_side = []
    for r in scene.sides:
        c = scene.cross[r]
        per_side.append(c.reshape(-1, r, r, c.shape[-1]).mean(axis=0))  # (r, r, t)
    out = []
    for tokens in class_tokens:
        maps = []
        for t in tokens:
            ups = []
            for a in per_side:
                up = cv2.resize(a[..., t].copy(), (size, size), interpolation=cv2.INTER_CUBIC)
                ups.append(up / up.max())
            maps.append(np.mean(ups, axis=0))
        out.append(np.mean(maps, axis=0))
    return np.stack(out)


def dataset_diffusion(scene: Scene, class_tokens: list[list[int]], size: int = 512):
    """Dataset Diffusion ``gen_data.py`` in PyTorch: CA at the coarse side and
    SA at the next (means over layers x heads), CA bicubic to the SA side, ``matrix_power(SA,
    4) @ ca``, min-max per class, bicubic to the image; label = argmax + 1 where the max is
    >= 0.6, 255 where it is in [0.5, 0.6). Returns ``(outs (k, size, size), label)``."""
    import torch
    import torch.nn.functional as F

    cr, sr = scene.sides[0], scene.sides[1]
    c = scene.cross[cr]
    cross = torch.tensor(c.reshape(-1, cr, cr, c.shape[-1]).mean(axis=0))[None]  # (1, r, r, t)
    cross = F.interpolate(cross.permute(0, 3, 1, 2), (sr, sr), mode="bicubic")[0]  # (t, sr, sr)
    s = scene.self_attn[sr]
    affinity = torch.tensor(s.reshape(-1, sr * sr, sr * sr).mean(axis=0))
    affinity = torch.matrix_power(affinity, 4)
    outs = []
    for tokens in class_tokens:
        ca = cross[tokens].mean(dim=0)
        out = (affinity @ ca.reshape(sr * sr, 1)).reshape(sr, sr)
        out = out - out.min()
        outs.append(out / out.max())
    outs = F.interpolate(torch.stack(outs)[None], (size, size), mode="bicubic")[0].numpy()
    top = outs.max(axis=0)
    label = np.zeros((size, size), np.uint8)
    valid = top >= 0.6
    label[valid] = (outs.argmax(axis=0) + 1)[valid]
    label[(top < 0.6) & (top >= 0.5)] = 255
    return outs, label


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)
