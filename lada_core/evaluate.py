"""The X-TAIL inference rule over all class names (method page, section 6).

At every step each test image of every dataset is scored against ALL class names of the benchmark,
seen and unseen, with no dataset identity: seen classes use their cached tuned text features,
unseen classes the frozen zero-shot text features. When the router (argmax of those scores) picks a
seen class, the LADA logits of the seen classes are added and the unseen ones are masked out. With
the selector (``lada.selector``), frozen zero-shot CLIP routes: an image it sends to an unseen class
keeps zero-shot CLIP's logits over all classes; one it sends to a seen class gets the tuned text
plus the LADA logits over the seen classes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lada_core.model import UnitIndex, inference_logits, lada_logits, selector_logits


@dataclass
class EvalState:
    """Everything inference needs after step j."""

    text_seen: torch.Tensor  # [n_seen, D] tuned, L2-normalised
    text_zeroshot: torch.Tensor  # [n_all, D] frozen CLIP, L2-normalised
    units: torch.Tensor | None  # [U, D] all memory units so far (None: variant without units)
    class_map: torch.Tensor | None  # [U, n_seen]
    tau: float
    alpha: float
    beta: float
    selector: bool = False


def predict(features: torch.Tensor, st: EvalState, index: UnitIndex | None = None) -> torch.Tensor:
    """Global class predictions ``[B]`` for unnormalised image features ``[B, D]``. ``index``: the
    :class:`~lada_core.model.UnitIndex` of ``st.class_map`` (built once by the caller; optional)."""
    x = F.normalize(features.float(), dim=-1)
    n_seen = st.text_seen.shape[0]
    text_all = torch.cat([st.text_seen, st.text_zeroshot[n_seen:]], dim=0)
    has_units = st.units is not None and st.class_map is not None and st.units.numel() > 0
    h = lada_logits(x, st.units, st.class_map, st.beta, index) if has_units else None  # type: ignore[arg-type]
    if st.selector:
        return selector_logits(x, st.text_seen, st.text_zeroshot, st.tau, st.alpha, h).argmax(dim=1)
    return inference_logits(x, text_all, n_seen, st.tau, st.alpha, h).argmax(dim=1)


def accuracy(features: np.ndarray, labels: np.ndarray, offset: int, st: EvalState, batch_size: int = 1024, device: torch.device | None = None) -> float:
    """Share (in percent) of images whose argmax over all class names is the true global label."""
    device = device or st.text_seen.device
    index = UnitIndex(st.class_map) if st.units is not None and st.units.numel() and st.class_map is not None else None
    correct = 0
    for start in range(0, len(labels), batch_size):
        f = torch.from_numpy(np.asarray(features[start : start + batch_size], dtype=np.float32)).to(device)
        pred = predict(f, st, index).cpu().numpy()
        correct += int((pred == offset + np.asarray(labels[start : start + batch_size])).sum())
    return 100.0 * correct / max(1, len(labels))
