"""Each equation of the method page against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lada_core import metrics as M
from lada_core.evaluate import EvalState, predict
from lada_core.model import (
    AdaptFormer,
    GaussianBank,
    block_diagonal_map,
    grow_class_map,
    inference_logits,
    lada_logits,
    sample_replay,
    selector_logits,
    training_logits,
    weighted_cross_entropy,
)

pytestmark = pytest.mark.unit


def test_lada_logit_hand_computed() -> None:
    # two units for class 0, one for class 1; x along e1
    units = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    cmap = block_diagonal_map([2, 1])
    x = torch.tensor([[1.0, 0.0]])
    beta = 2.0
    h = lada_logits(x, units, cmap, beta)
    # class 0: exp(-2(1-1)) + exp(-2(1-0)) = 1 + e^-2 ; class 1: exp(-2(1-0.6)) = e^-0.8
    expected = torch.tensor([[1 + math.exp(-2), math.exp(-0.8)]])
    assert torch.allclose(h, expected, atol=1e-6)


def test_block_diagonal_map_and_growth() -> None:
    c = block_diagonal_map([2, 1])
    assert c.tolist() == [[1, 0], [1, 0], [0, 1]]
    grown = grow_class_map(c, [1, 2])
    assert grown.tolist() == [
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
    ]
    # a unit belongs to exactly one class
    assert (grown.sum(1) == 1).all()


def test_replay_sampler_and_weights() -> None:
    bank = GaussianBank(
        means=torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]),
        variances=torch.tensor([4.0, 0.25, 1.0]),  # sigma = 2, 0.5, 1
        weights=torch.tensor([0.7, 0.3, 1.0]),
        labels=torch.tensor([0, 0, 1]),
    )
    eps = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 0.5]])
    feats, labels, w = sample_replay(bank, gamma=64.0, eps=eps)
    assert torch.allclose(feats, torch.tensor([[3.0, 0.0], [4.0, 4.0], [0.5, 0.5]]))
    assert labels.tolist() == [0, 0, 1]
    assert torch.allclose(w, torch.tensor([64 * 0.7, 64 * 0.3, 64.0]))
    # fresh noise on every call
    g = torch.Generator().manual_seed(0)
    a, _, _ = sample_replay(bank, 1.0, generator=g)
    b, _, _ = sample_replay(bank, 1.0, generator=g)
    assert not torch.allclose(a, b)
    # statistics: mean mu, per-dimension std sigma
    many = torch.stack([sample_replay(bank, 1.0, generator=g)[0] for _ in range(4000)])
    assert torch.allclose(many.mean(0), bank.means, atol=0.1)
    assert torch.allclose(many.std(0)[:, 0], bank.variances.sqrt(), atol=0.1)


def test_weighted_cross_entropy_reductions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    w = torch.tensor([1.0, 3.0])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = -math.log(1 / (1 + math.e))
    assert weighted_cross_entropy(logits, labels, w, "mean").item() == pytest.approx((ce0 + 3 * ce1) / 2, rel=1e-6)
    assert weighted_cross_entropy(logits, labels, w, "weight_sum").item() == pytest.approx((ce0 + 3 * ce1) / 4, rel=1e-6)


def test_training_logits() -> None:
    x = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[0.5, 2.0]])
    z = training_logits(x, text, tau=100.0, alpha=0.5, h=h)
    assert torch.allclose(z, torch.tensor([[100.25, 1.0]]))


def test_inference_rule_seen_vs_unseen() -> None:
    # 2 seen classes, 1 unseen; LADA logits favour seen class 1
    text_all = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    h_seen = torch.tensor([[0.0, 50.0], [0.0, 50.0]])
    x_seen = torch.tensor([[1.0, 0.0]])  # argmax s = class 0 (seen) -> LADA added -> class 1 wins
    x_unseen = torch.tensor([[0.0, 1.0]])  # argmax s = class 2 (unseen) -> s unchanged -> class 2
    out = inference_logits(torch.cat([x_seen, x_unseen]), text_all, n_seen=2, tau=100.0, alpha=1.0, h_seen=h_seen)
    assert out[0].argmax().item() == 1
    assert out[0, 2].item() < -1e5  # unseen masked when routed to seen
    assert torch.allclose(out[1], 100.0 * (x_unseen @ text_all.t())[0])
    assert out[1].argmax().item() == 2


def test_predict_with_and_without_selector() -> None:
    """Without selector the router is argmax s (tuned seen text); with it, frozen zero-shot CLIP."""
    x = torch.tensor([[1.0, 0.0]])
    text_seen = torch.tensor([[0.99, math.sqrt(1 - 0.99**2)]])  # tuned class 0: cos 0.99 with x
    text_zs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # zero-shot: seen class 0 and unseen class 1 tie
    units = torch.tensor([[1.0, 0.0]])
    cmap = block_diagonal_map([1])
    plain = EvalState(text_seen, text_zs, units, cmap, tau=100.0, alpha=5.0, beta=1.0, selector=False)
    routed = EvalState(text_seen, text_zs, units, cmap, tau=100.0, alpha=5.0, beta=1.0, selector=True)
    # s = [99, 100]: argmax unseen -> no LADA bonus -> class 1
    assert predict(x, plain).item() == 1
    # zero-shot argmax (tie -> class 0) is seen -> s + 5 * h = [99 + 5, -1e6] -> class 0
    assert predict(x, routed).item() == 0


def test_selector_routed_unseen_gets_zero_shot_logits() -> None:
    """The authors' ``test_w_selector``: an image that frozen zero-shot CLIP sends to an unseen class
    is predicted by zero-shot CLIP over all classes, even where a tuned seen class (and its LADA
    logits) would win; an image sent to a seen class is scored over the seen classes only."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # zero-shot text: seen class 0 at (0, 1), unseen class 1 at (0.8, 0.6), unseen class 2 at (0.6, 0.8)
    text_zs = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    text_seen = torch.tensor([[1.0, 0.0]])  # tuned class 0 moved onto x[0]: cos 1.0 > 0.8
    units = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cmap = block_diagonal_map([2])
    st = EvalState(text_seen, text_zs, units, cmap, tau=100.0, alpha=5.0, beta=1.0, selector=True)
    # x[0]: zero-shot argmax = class 1 (unseen) -> zero-shot logits -> class 1, though tuned class 0 scores 100 > 80.
    # x[1]: zero-shot argmax = class 0 (seen) -> tuned text + LADA over seen classes only -> class 0.
    assert predict(x, st).tolist() == [1, 0]
    out = selector_logits(F.normalize(x, dim=-1), text_seen, text_zs, 100.0, 5.0, torch.ones(2, 1))
    assert torch.allclose(out[0], 100.0 * (x[0] @ text_zs.t()))  # the zero-shot logits themselves
    assert out[1, 0].item() == pytest.approx(100.0 * 0.0 + 5.0) and (out[1, 1:] < -1e5).all()
    # without selector, the tuned seen class wins x[0] (the default rule routes by the tuned scores)
    assert predict(x, EvalState(text_seen, text_zs, units, cmap, 100.0, 5.0, 1.0, selector=False))[0].item() == 0


def test_adaptformer_init_and_count() -> None:
    a = AdaptFormer(512, 16)
    assert sum(p.numel() for p in a.parameters()) == 1024 + 8208 + 8704 + 1
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    assert torch.count_nonzero(a.down.bias) == 0 and a.scale.item() == 1.0
    h = torch.randn(3, 7, 512)
    assert torch.equal(a(h), torch.zeros_like(h))


def test_metrics_on_small_matrix() -> None:
    acc = np.array([[80.0, 10.0, 20.0], [70.0, 90.0, 30.0], [60.0, 85.0, 95.0]])
    s = M.summarize(acc)
    # transfer: t=2: a[0,1] = 10; t=3: mean(a[0,2], a[1,2]) = 25 -> 17.5
    assert s[M.TRANSFER] == pytest.approx(17.5)
    # average: column means 70, 61.667, 48.333 -> 60
    assert s[M.AVERAGE] == pytest.approx((70 + 185 / 3 + 145 / 3) / 3)
    assert s[M.LAST] == pytest.approx(80.0)
    per = M.per_dataset(acc, ["a", "b", "c"])
    assert M.TRANSFER not in per["a"] and per["c"][M.TRANSFER] == pytest.approx(25.0)
    assert per["b"][M.LAST] == 85.0
    # partial summary after the last step equals the summary; inputs untouched
    before = acc.copy()
    p = M.partial_summary(acc)
    assert p[M.TRANSFER] == pytest.approx(s[M.TRANSFER]) and p[M.AVERAGE] == pytest.approx(s[M.AVERAGE])
    assert p[M.LAST] == pytest.approx(s[M.LAST])
    p0 = M.partial_summary(acc[:1])
    assert p0[M.SEEN_MEAN] == 80.0 and p0[M.TRANSFER] == pytest.approx(10.0)
    assert np.array_equal(acc, before)
    assert M.weighted(s, {M.LAST: 1, M.AVERAGE: 1}) == pytest.approx((s[M.LAST] + s[M.AVERAGE]) / 2)
