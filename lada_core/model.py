"""LADA's parts: the text AdaptFormer, the memory units and the Gaussian replay buffers.

Reference: Luo, Zhou, Wei, Zhang, "LADA: Scalable Label-Specific CLIP Adapter for Continual
Learning", ICML 2025 (arXiv 2505.23271); the equations follow ``lada_method.md`` (sections 1-5).
The functions of this module are pure (they never modify their inputs); the modules hold state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AdaptFormer(nn.Module):
    """``A(h) = s * up(ReLU(down(LN(h))))``, d -> bottleneck -> d (method page, section 1).

    ``down``: kaiming-normal (a = sqrt 5), zero bias; ``up``: zero weight and bias, so a fresh adapter
    adds exactly nothing and every task starts at zero-shot CLIP; ``s``: learnable scalar, init 1.
    Trainable count for d = 512, bottleneck 16: LN 1024 + down 8208 + up 8704 + s 1.
    """

    def __init__(self, d: int, bottleneck: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(self.ln(h))))


class AdaptedTextEncoder(nn.Module):
    """open_clip's text tower with an AdaptFormer after the attention sub-block of every block:

    ``h = h + attn(LN1(h));  h = MLP(LN2(h)) + r * A(h) + h`` with ``r = 0.1``.

    The CLIP parameters are not owned (not registered as sub-modules), so ``parameters()`` yields the
    adapters alone and a state dict holds nothing of CLIP.
    """

    def __init__(self, text_module: Any, bottleneck: int = 16, residual: float = 0.1) -> None:
        super().__init__()
        self.__dict__["clip_text"] = text_module  # not a registered sub-module: frozen, not trained
        blocks = text_module.transformer.resblocks
        width = int(text_module.transformer.width)
        self.adapters = nn.ModuleList([AdaptFormer(width, bottleneck) for _ in blocks])
        self.residual = residual

    def forward(self, tokens: torch.Tensor, use_adapters: bool = True) -> torch.Tensor:
        """Tokens ``[C, L]`` -> L2-normalised text features ``[C, D]`` (EOT token, text projection).

        ``L`` may be shorter than the context length (see :meth:`trim`): positions ``0..L-1`` get the
        same positional embeddings and causal mask as in the full context."""
        from open_clip.transformer import text_global_pool

        tm: Any = self.clip_text
        cast = tm.transformer.get_cast_dtype()
        length = tokens.shape[1]
        x = tm.token_embedding(tokens).to(cast) + tm.positional_embedding[:length].to(cast)  # [C, L, W]
        tr = tm.transformer
        if not getattr(tr, "batch_first", True):
            x = x.transpose(0, 1)
        mask = tm.attn_mask
        if mask is not None and mask.shape[0] != length:
            mask = mask[:length, :length]
        for block, adapter in zip(tr.resblocks, self.adapters):
            x = x + block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=mask))
            out = x + block.ls_2(block.mlp(block.ln_2(x)))
            if use_adapters:
                out = out + self.residual * adapter(x)
            x = out
        if not getattr(tr, "batch_first", True):
            x = x.transpose(0, 1)
        x = tm.ln_final(x)
        x = text_global_pool(x, tokens, getattr(tm, "text_pool_type", "argmax"), eos_token_id=getattr(tm, "text_eos_id", None))
        if isinstance(x, tuple):  # older open_clip returned (pooled, tokens)
            x = x[0]
        proj = tm.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [C, L]`` without the padding after the last end-of-text token of the batch.

        With a causal mask, position ``i`` attends to positions ``<= i`` only, so the EOT output of
        each prompt does not depend on the padding after it: the features are the same (up to float
        rounding: the matrix products have other shapes) for a fraction of the compute (X-TAIL prompts
        are 8-20 tokens of CLIP's 77). Towers without a causal mask or EOT pooling are left as they are.
        """
        tm: Any = self.clip_text
        pool = getattr(tm, "text_pool_type", "argmax")
        mask = tm.attn_mask
        if tokens.ndim != 2 or tokens.shape[1] < 2 or pool not in ("argmax", "eos") or mask is None or not _is_causal(mask):
            return tokens
        if pool == "argmax":
            last = tokens.argmax(dim=-1)
        else:
            eos = getattr(tm, "text_eos_id", None)
            if eos is None:
                return tokens
            last = (tokens == eos).int().argmax(dim=-1)
        return tokens[:, : int(last.max()) + 1]


def _is_causal(mask: torch.Tensor) -> bool:
    """True for an additive ``[L, L]`` mask that blocks exactly the positions above the diagonal."""
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    blocked = torch.isinf(mask) & (mask < 0)
    upper = torch.ones_like(blocked).triu(1)
    return bool((blocked == upper).all()) and bool((mask[~blocked] == 0).all())


# --------------------------------------------------------------------------------------------------
# Memory units and the LADA logits (section 3 and 4)


def block_diagonal_map(units_per_class: list[int] | np.ndarray) -> torch.Tensor:
    """The 0/1 map C ``[U, n_classes]`` from memory units to classes: unit u belongs to one class."""
    counts = [int(c) for c in units_per_class]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    return F.one_hot(owner, num_classes=len(counts)).float()


def grow_class_map(c_old: torch.Tensor | None, units_per_class: list[int] | np.ndarray) -> torch.Tensor:
    """Append a new task's block to the block-diagonal map (old units keep their classes)."""
    new = block_diagonal_map(units_per_class)
    if c_old is None or c_old.numel() == 0:
        return new
    top = torch.cat([c_old, torch.zeros(c_old.shape[0], new.shape[1])], dim=1)
    bottom = torch.cat([torch.zeros(new.shape[0], c_old.shape[1]), new], dim=1)
    return torch.cat([top, bottom], dim=0)


class UnitIndex:
    """Which memory units belong to which class, for :func:`lada_logits`, built once from a 0/1 map C.

    Multiplying by C sums each class's units; a sum over each class's units is the same and costs
    O(B U) instead of O(B U n) (the dense map grows with the square of the classes seen: 17600 units
    x 1100 classes at the end of X-TAIL). ``equal``: units sorted by class, ``k`` per class (the
    usual case: a view then a sum); otherwise a padded gather ``[n, kmax]``. A map that is not 0/1
    with one class per unit keeps the matrix product (``dense``).
    """

    def __init__(self, class_map: torch.Tensor) -> None:
        u, n = class_map.shape
        self.num_units, self.num_classes = int(u), int(n)
        self.k: int | None = None
        self.gather: torch.Tensor | None = None
        self.dense = False
        if u == 0 or n == 0:
            return
        binary = bool(((class_map == 0) | (class_map == 1)).all()) and bool((class_map.sum(dim=1) == 1).all())
        if not binary:
            self.dense = True
            return
        owner = class_map.argmax(dim=1)  # [U]
        counts = torch.bincount(owner, minlength=n)  # [n]
        if bool((owner[1:] >= owner[:-1]).all()) and bool((counts == counts[0]).all()):
            self.k = int(counts[0])
            return
        order = torch.argsort(owner, stable=True)  # units grouped by class, in unit order
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(u, device=owner.device) - starts[owner[order]]
        gather = torch.full((n, int(counts.max())), u, dtype=torch.long, device=owner.device)  # u: a zero column
        gather[owner[order], rank] = order
        self.gather = gather

    @classmethod
    def from_counts(cls, units_per_class: list[int] | np.ndarray) -> UnitIndex:
        """The index of :func:`block_diagonal_map` ``(units_per_class)``, without building the map."""
        return cls(block_diagonal_map(units_per_class))

    def to(self, device: torch.device | str) -> UnitIndex:
        if self.gather is not None:
            self.gather = self.gather.to(device)
        return self

    def class_sum(self, e: torch.Tensor, class_map: torch.Tensor) -> torch.Tensor:
        """``e @ class_map``: ``e [B, U]`` -> ``[B, n]``."""
        b = e.shape[0]
        if self.num_units == 0 or self.num_classes == 0:
            return e.new_zeros(b, self.num_classes)
        if self.dense:
            return e @ class_map.to(e.dtype)
        if self.k is not None:
            return e.reshape(b, self.num_classes, self.k).sum(dim=-1)
        assert self.gather is not None
        padded = torch.cat([e, e.new_zeros(b, 1)], dim=1)  # [B, U + 1]
        return padded[:, self.gather.reshape(-1)].reshape(b, self.num_classes, -1).sum(dim=-1)


def lada_logits(x: torch.Tensor, units: torch.Tensor, class_map: torch.Tensor, beta: float, index: UnitIndex | None = None) -> torch.Tensor:
    """``h_j(x) = sum_{w in units of j} exp(-beta * (1 - <w, x>))`` = ``exp(-beta + beta x W^T) C``.

    x ``[B, D]`` (L2-normalised), units ``[U, D]``, class_map ``[U, n]`` -> ``[B, n]``. The product
    with C is computed as a sum over each class's units (:class:`UnitIndex`; pass ``index`` to build
    it once, e.g. once per task in the training loop).
    """
    if index is None:
        index = UnitIndex(class_map)
    e = (x @ units.t()).mul_(beta).add_(-beta).exp_()  # [B, U] = exp(-beta + beta x W^T), one buffer
    return index.class_sum(e, class_map)


def kmeans_units(features: np.ndarray, labels: np.ndarray, n_classes: int, lambda1: int, n_init: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Per-class k-means centres with ``n_clusters = min(lambda1, n_j)`` (section 3).

    Features are L2-normalised test-transform features ``[N, D]``; returns the stacked centres
    ``[U, D]`` (class order) and the number of units of each class.
    """
    from sklearn.cluster import KMeans

    centres, counts = [], []
    for j in range(n_classes):
        fj = features[labels == j]
        k = min(lambda1, len(fj))
        if k == len(fj):
            # Every point is its own cluster (e.g. 16 shots with lambda1 = 16): k-means returns the
            # points themselves; skip the fit (identical result, and no empty-cluster warnings).
            c = fj.astype(np.float32)
        else:
            c = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(fj.astype(np.float64)).cluster_centers_
        centres.append(np.asarray(c, dtype=np.float32))
        counts.append(k)
    return np.concatenate(centres, axis=0), counts


# --------------------------------------------------------------------------------------------------
# Gaussian-mixture replay (section 4 and 5)


@dataclass
class GaussianBank:
    """Spherical Gaussian mixtures of the old classes, in the unnormalised feature space.

    ``means [M, D]``, ``variances [M]`` (spherical), ``weights [M]`` (mixture weight pi of each
    component), ``labels [M]`` (global class index of each component). One row per component.
    """

    means: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    variances: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.labels.numel())

    def extend(self, other: GaussianBank) -> GaussianBank:
        if len(self) == 0:
            return other
        return GaussianBank(
            torch.cat([self.means, other.means]),
            torch.cat([self.variances, other.variances]),
            torch.cat([self.weights, other.weights]),
            torch.cat([self.labels, other.labels]),
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "variances": self.variances, "weights": self.weights, "labels": self.labels}

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> GaussianBank:
        return cls(s["means"], s["variances"], s["weights"], s["labels"])


def fit_gaussians(features: np.ndarray, labels: np.ndarray, n_classes: int, lambda2: int, offset: int, seed: int) -> GaussianBank:
    """Per class a ``covariance_type='spherical'`` GaussianMixture with ``min(lambda2, n_j)``
    components on the unnormalised test-transform features (section 5)."""
    from sklearn.mixture import GaussianMixture

    means, variances, weights, owners = [], [], [], []
    for j in range(n_classes):
        fj = features[labels == j].astype(np.float64)
        k = min(lambda2, len(fj))
        gm = GaussianMixture(n_components=k, covariance_type="spherical", random_state=seed, reg_covar=1e-6).fit(fj)
        means.append(gm.means_)
        variances.append(np.asarray(gm.covariances_).reshape(-1))
        weights.append(gm.weights_)
        owners.append(np.full(k, offset + j))
    return GaussianBank(
        torch.tensor(np.concatenate(means), dtype=torch.float32),
        torch.tensor(np.concatenate(variances), dtype=torch.float32),
        torch.tensor(np.concatenate(weights), dtype=torch.float32),
        torch.tensor(np.concatenate(owners), dtype=torch.long),
    )


def sample_replay(bank: GaussianBank, gamma: float, generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One replayed feature per stored component: ``p = mu + sigma * eps``, eps ~ N(0, I), fresh each
    call; weight ``gamma * pi``. Returns (features ``[M, D]`` unnormalised, labels ``[M]``, weights ``[M]``).
    ``eps`` may be given (tests)."""
    if eps is None:
        eps = torch.randn(bank.means.shape, generator=generator, device=bank.means.device)
    feats = bank.means + bank.variances.clamp_min(0).sqrt().unsqueeze(1) * eps
    return feats, bank.labels, gamma * bank.weights


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, reduction: str = "mean", denom: float | None = None) -> torch.Tensor:
    """One weighted cross-entropy over the batch (section 4). ``mean``: mean of w * CE (the reference
    code); ``weight_sum``: sum of w * CE / sum of w (OPEN switch ``lada.loss_reduction``). ``denom``
    replaces the denominator (data-parallel: each rank holds a slice of the global batch)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    if denom is not None:
        return (weights * ce).sum() / denom
    if reduction == "mean":
        return (weights * ce).mean()
    if reduction == "weight_sum":
        return (weights * ce).sum() / weights.sum().clamp_min(1e-12)
    raise ValueError(f"unknown reduction {reduction!r}")


def training_logits(x: torch.Tensor, text: torch.Tensor, tau: float, alpha: float, h: torch.Tensor | None) -> torch.Tensor:
    """``z = tau * cos(x, T) + alpha * h(x)`` over the seen classes; x and text are L2-normalised."""
    z = tau * (x @ text.t())
    if h is not None:
        z = z + alpha * h
    return z


def inference_logits(
    x: torch.Tensor,
    text_all: torch.Tensor,
    n_seen: int,
    tau: float,
    alpha: float,
    h_seen: torch.Tensor | None,
) -> torch.Tensor:
    """The X-TAIL inference rule "without selector" (section 6), over ALL class names (seen first).

    ``s = tau * cos(x, T_all)``; where argmax s is a seen class, add ``alpha * [h_seen; -1e6]``.
    """
    s = tau * (x @ text_all.t())  # [B, n_all]
    if h_seen is None or n_seen == 0:
        return s
    seen = s.argmax(dim=1) < n_seen  # [B]
    bonus = torch.full_like(s, -1e6)
    bonus[:, :n_seen] = alpha * h_seen
    return torch.where(seen.unsqueeze(1), s + bonus, s)


def selector_logits(
    x: torch.Tensor,
    text_seen: torch.Tensor,
    text_zeroshot: torch.Tensor,
    tau: float,
    alpha: float,
    h_seen: torch.Tensor | None,
) -> torch.Tensor:
    """Inference "with selector" (section 6; the authors' ``test_w_selector``), over ALL class names.

    The router is frozen zero-shot CLIP: ``zs = tau * cos(x, T_zeroshot)`` over all classes.
    An image whose argmax zs is an unseen class gets ``zs`` itself (its prediction is zero-shot
    CLIP's); an image routed to a seen class gets ``tau * cos(x, T_seen) + alpha * h`` over the seen
    classes only (unseen classes at -1e6). ``x`` ``[B, D]`` and the text features are L2-normalised;
    ``text_seen`` ``[n_seen, D]`` tuned, ``text_zeroshot`` ``[n_all, D]`` frozen, ``h_seen`` ``[B, n_seen]``.
    """
    n_seen = text_seen.shape[0]
    zs = tau * (x @ text_zeroshot.t())  # [B, n_all]
    if n_seen == 0:
        return zs
    routed = zs.argmax(dim=1) < n_seen  # [B]
    adapted = torch.full_like(zs, -1e6)
    adapted[:, :n_seen] = tau * (x @ text_seen.t()) + (alpha * h_seen if h_seen is not None else 0.0)
    return torch.where(routed.unsqueeze(1), adapted, zs)
