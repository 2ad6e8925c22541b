"""The only importer of open_clip: model, transforms and tokenizer.

``load_backbone(model, pretrained)`` loads any open_clip architecture by name with a pretrained tag
(``openai``, ``laion2b_s34b_b88k``, ...), a local checkpoint path, or ``None`` (random init, used by
the tests). Extra JSON model configs (the tests' tiny models) are registered with
:func:`register_model_configs`. The tag ``lada-offline`` (:data:`OFFLINE_TAG`) means the project's own
offline-pretrained weights of a packaged model (``lada-mini``): pretrained on first use by
:mod:`lada_core.mini_clip`, then read from its content-addressed file.

Activation (method page, section 2): OpenAI's CLIP was trained with QuickGELU, while open_clip's
``ViT-B-16`` config builds ``nn.GELU`` and only warns when OpenAI weights are loaded into it. Here
the activation follows the weights (:func:`quick_gelu_plan`): a tag whose open_clip entry says
``quick_gelu`` (``openai``) and a TorchScript archive (the ``.pt`` files of OpenAI's ``clip``
package, e.g. ``ViT-B-16.pt``) get QuickGELU whatever the architecture's config says; a plain
state-dict file gets the architecture's own activation, so name the ``-quickgelu`` model
(``ViT-B-16-quickgelu``, the default) for OpenAI weights saved as a state dict. The effective
activation is part of the weights' identity (the feature-cache key).

Transforms follow the method page, section 7: train = RandomResizedCrop(size, bicubic) + horizontal
flip (none for datasets marked ``augment=False``: MNIST, EuroSAT); test = Resize(size, bicubic) +
CenterCrop(size). Both end with the model's own normalisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lada_core.config import _line

RANDOM_INIT_SEED = 0


class BackboneError(ValueError):
    """An unknown model, a missing checkpoint or weights that cannot be fetched (one-line message)."""


@dataclass
class Backbone:
    model: Any  # open_clip CLIP (an nn.Module), frozen, eval mode
    name: str
    pretrained: str | None
    image_size: int
    train_transform: Callable[[Any], torch.Tensor]
    test_transform: Callable[[Any], torch.Tensor]
    plain_transform: Callable[[Any], torch.Tensor]  # train-time transform of augment=False datasets
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform_desc: str  # identifies the transforms in the cache key

    @property
    def embed_dim(self) -> int:
        proj = self.text_module.text_projection
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1])

    @property
    def text_module(self) -> Any:
        """The module holding the text tower's parts (CLIP itself, or CustomTextCLIP.text)."""
        return getattr(self.model, "text", None) or self.model

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen ``encode_image`` (unnormalised features, float32)."""
        with torch.no_grad():
            return self.model.encode_image(pixels).float()


PACKAGED_MODELS = Path(__file__).resolve().parent / "data" / "models"
"""Model configs shipped with the package: ``lada-tiny`` (a random-init toy for shape tests), ``lada-mini``
(the mini CLIP, with ``pretrained=lada-offline``), ``lada-small``."""
OFFLINE_TAG = "lada-offline"
"""``backbone.pretrained`` value: the project's own offline-pretrained weights (see lada_core.mini_clip)."""
_registered: set[str] = set()


def _register_packaged() -> None:
    if str(PACKAGED_MODELS) not in _registered:
        register_model_configs(PACKAGED_MODELS)


def register_model_configs(path: str | Path) -> None:
    """Register extra open_clip JSON model configs (a folder of ``<name>.json`` files, or one file)."""
    import open_clip

    p = Path(path)
    if not p.exists():
        raise BackboneError(f"model config folder not found: {p}")
    if str(p.resolve()) in _registered:
        return
    open_clip.add_model_config(p)
    _registered.add(str(p.resolve()))


def _is_path_like(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or pretrained.startswith(".")
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )


def model_config(name: str) -> dict[str, Any]:
    """The open_clip JSON config of ``name`` (packaged configs included)."""
    import open_clip

    _register_packaged()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    return dict(cfg)


def model_names() -> list[str]:
    import open_clip

    _register_packaged()
    return list(open_clip.list_models())


def check_model(name: str, pretrained: str | None, model_config_dir: str | None = None) -> None:
    """Validate the model name and the pretrained source without building anything."""
    import open_clip

    _register_packaged()
    if model_config_dir:
        register_model_configs(model_config_dir)
    if name not in open_clip.list_models():
        known = open_clip.list_models()
        close = [m for m in known if name.lower().split("-")[0] in m.lower()][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise BackboneError(f"unknown open_clip model {name!r}{hint}; see open_clip.list_models()")
    if pretrained == OFFLINE_TAG:
        from lada_core.mini_clip import RECIPES

        if name not in RECIPES:
            raise BackboneError(
                f"pretrained={OFFLINE_TAG} (the project's own offline weights) exists for {', '.join(RECIPES)} only, not {name!r}"
            )
        return
    if pretrained and _is_path_like(pretrained) and not Path(pretrained).is_file():
        raise BackboneError(f"checkpoint file not found: {pretrained}")
    if pretrained and not _is_path_like(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise BackboneError(
                f"unknown pretrained tag {pretrained!r} for {name} (valid: {', '.join(tags) or 'none'}; "
                f"or a local checkpoint path, or null for random init)"
            )


def load_backbone(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    model_config_dir: str | None = None,
) -> Backbone:
    """Load an open_clip model, frozen (no parameter requires grad) and in eval mode."""
    import open_clip
    from torchvision import transforms as T

    check_model(name, pretrained, model_config_dir)
    weights = pretrained
    if pretrained == OFFLINE_TAG:  # the project's own weights: pretrained here on first use
        from lada_core.mini_clip import PretrainError, ensure_weights

        try:
            weights = str(ensure_weights(name))
        except PretrainError as exc:
            raise BackboneError(str(exc)) from None
    force_quick_gelu = quick_gelu_plan(name, weights)
    torchscript = bool(weights) and _is_path_like(weights or "") and is_torchscript_archive(weights or "")
    try:
        # Random init (pretrained=None, the tests' models) is seeded, so that every process that
        # loads the model (cache extraction, each trial) gets the same weights. Without network,
        # the hub is used in offline mode (local cache only) instead of retrying for a minute.
        with torch.random.fork_rng(devices=[]), _quiet_open_clip(), _hub_offline_if_unreachable(weights), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if torchscript else (weights or None), device=device,
                force_quick_gelu=force_quick_gelu,
            )
        for w in caught:  # never left to a warning (see the module docstring)
            if "QuickGELU mismatch" in str(w.message):
                raise BackboneError(f"{name} with {pretrained}: activation mismatch: {_line(str(w.message))}")
        if torchscript:
            _load_torchscript_weights(model, str(weights), device)
    except BackboneError:
        raise
    except Exception as exc:  # network failure, corrupt checkpoint, ...
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if pretrained and not _is_path_like(pretrained) and pretrained != OFFLINE_TAG:
            if not _hub_reachable():
                first = UNREACHABLE
            raise _cannot_fetch(name, pretrained, first) from None
        raise BackboneError(f"could not load {name} from {weights}: {first}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    normalize = next((t for t in getattr(preprocess, "transforms", []) if isinstance(t, T.Normalize)), None)
    if normalize is None:  # pragma: no cover - every open_clip transform ends with Normalize
        raise BackboneError(f"{name}: could not find the model's normalisation")
    bicubic = T.InterpolationMode.BICUBIC
    rgb = T.Lambda(_to_rgb)
    test_tf = T.Compose([rgb, T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), normalize])
    train_tf = T.Compose(
        [rgb, T.RandomResizedCrop(size, interpolation=bicubic), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    desc = (
        f"arch={identity(name, pretrained)};size={size};test=Resize(bicubic)+CenterCrop;train=RandomResizedCrop(bicubic,scale=(0.08,1))+HFlip;"
        f"mean={list(normalize.mean)};std={list(normalize.std)}"
    )
    return Backbone(
        model=model,
        name=name,
        pretrained=pretrained,
        image_size=size,
        train_transform=train_tf,
        test_transform=test_tf,
        plain_transform=test_tf,
        tokenizer=open_clip.get_tokenizer(name),
        transform_desc=desc,
    )


UNREACHABLE = "huggingface.co is unreachable and the weights are not in the local cache"


def _cannot_fetch(name: str, pretrained: str, why: str) -> BackboneError:
    return BackboneError(
        f"could not fetch pretrained weights {name}/{pretrained} ({why}); without network, "
        f"download the checkpoint elsewhere and pass its path: --set backbone.pretrained=/path/to/ckpt.pt"
    )


def check_weights_available(name: str, pretrained: str | None, model_config_dir: str | None = None) -> None:
    """Fail early, before any long work (a cluster, a sweep), when a pretrained tag's weights can be
    neither found in the local cache nor fetched: :func:`load_backbone` would fail the same way later.
    Checks the name and tag (:func:`check_model`); a path or random init needs nothing more."""
    check_model(name, pretrained, model_config_dir)
    if not pretrained or pretrained == OFFLINE_TAG or _is_path_like(pretrained) or _hub_reachable():
        return  # random init, the project's own weights (pretrained on first use), a path, or the hub is there
    import open_clip

    try:  # the hub is unreachable: open_clip's own lookup, on the local cache only
        with _quiet_open_clip(), _hub_offline_if_unreachable(pretrained):
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, pretrained))
    except Exception:
        path = ""
    if not path or not Path(path).is_file():
        raise _cannot_fetch(name, pretrained, UNREACHABLE)


def identity(name: str, pretrained: str | None) -> str:
    """A hash of what determines the weights: the architecture's JSON config (with the activation
    :func:`quick_gelu_plan` gives it) and the pretrained tag, or the checkpoint file's bytes, or the
    random-init seed, or (``lada-offline``) the sha256 of the project's own weights file. Part of the
    feature-cache key."""
    import hashlib
    import json

    import open_clip

    cfg = dict(open_clip.get_model_config(name))
    if quick_gelu_plan(name, pretrained):
        cfg["quick_gelu"] = True
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    if pretrained == OFFLINE_TAG:
        from lada_core.mini_clip import RECIPES, verified, weights_path

        meta = verified(weights_path(RECIPES[name]))
        h.update(f"{OFFLINE_TAG}|{meta['sha256'] if meta else RECIPES[name].key()}".encode())
    elif pretrained and _is_path_like(pretrained):
        with open(pretrained, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    else:
        h.update(f"{pretrained}|{RANDOM_INIT_SEED if not pretrained else ''}".encode())
    return h.hexdigest()[:16]


def is_torchscript_archive(path: str | Path) -> bool:
    """A TorchScript archive (a zip holding ``code/`` and ``constants.pkl``): how OpenAI's ``clip``
    package ships its weights (``ViT-B-16.pt``)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except OSError:
        return False


def weights_quick_gelu(name: str, pretrained: str | None) -> bool | None:
    """Whether the weights were trained with QuickGELU: from the tag's open_clip entry, True for a
    TorchScript archive (OpenAI's), None when it cannot be known (random init, a state-dict file)."""
    import open_clip

    if not pretrained:
        return None
    if _is_path_like(pretrained):
        return True if is_torchscript_archive(pretrained) else None
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    return bool(cfg.get("quick_gelu", False)) if cfg else None


def quick_gelu_plan(name: str, pretrained: str | None) -> bool:
    """True when the architecture must be built with QuickGELU although its config says GELU (OpenAI
    weights in ``ViT-B-16``): the mismatch is corrected. Weights trained with GELU in a QuickGELU
    architecture are an error (one line); unknown weights keep the architecture's activation."""
    import open_clip

    arch = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    trained = weights_quick_gelu(name, pretrained)
    if trained is None or trained == arch:
        return False
    if trained and not arch:
        return True
    plain = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else "a GELU architecture"
    raise BackboneError(f"{name} uses QuickGELU but the weights {pretrained} were trained with GELU: use {plain}")


def _load_torchscript_weights(model: Any, path: str, device: str | torch.device) -> None:
    """Load the weights of a TorchScript archive (OpenAI's ``clip`` files) into an open_clip CLIP.
    open_clip reads checkpoint files with ``torch.load(weights_only=True)``, which refuses them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": OpenAI's files are TorchScript
            sd = dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception as exc:
        raise BackboneError(f"could not read the TorchScript checkpoint {path}: {_line(str(exc))}") from None
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's extra ints
        sd.pop(key, None)
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # non-persistent (attn_mask)
    sd = {k: v for k, v in sd.items() if k not in transient}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise BackboneError(f"{path} does not fit {type(model).__name__}: {what}")
    model.to(device)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs to the root logger ("No pretrained weights loaded", download errors); our own
    errors say it better, once."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _hub_offline_if_unreachable(pretrained: str | None) -> Iterator[None]:
    if not pretrained or _is_path_like(pretrained) or _hub_reachable():
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _to_rgb(img: Any) -> Any:
    return img.convert("RGB") if hasattr(img, "convert") else img


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)
