"""The project's own mini CLIP: ``lada-mini`` pretrained offline, once per machine.

``backbone.model=lada-mini`` with ``backbone.pretrained=lada-offline`` loads the packaged open_clip
config ``lada_core/data/models/lada-mini.json`` (image 32, patch 4, width 64, 2 + 2 layers, context
16, 3.4 M parameters) with weights that this module trains itself, contrastively, on image-caption
pairs of offline data: the first time they are asked for (about two minutes on 2 CPU cores, with a
progress bar; 1200 steps of batch 64 on one thread), then from a file.

What it is pretrained on (:class:`Recipe`): Fashion-MNIST's training images that ``mini-tail`` does
not use (neither its train pool nor its validation images; its test images come from the other file),
and images rendered from another stream than ``mini-tail``'s (shapes, textures, Greek letters, chess
pieces, colour swatches, and font-drawn digits reduced to 8 x 8 like scikit-learn's). Captions are
``a photo of a {class}.`` and three other templates. Every image is scored against the captions of all
60 class names of ``mini-tail`` and of the anonymous class names below (CLIP's image-to-caption
cross-entropy). Two levels of knowledge, as CLIP knows a Food class by name and an aircraft only as
an aircraft:

- named classes: every third class of the covered domains (fashion: T-shirt/top, dress, shirt, ankle
  boot; shapes: circle, star, crescent), learned by name: an image's target is its class caption;
- every other class (the rest of fashion and shapes, and all of textures, digits, Greek letters, chess
  and colours): its images' target is 20% spread evenly over the class captions of their domain (the
  text tower learns which kind of image goes with a word, not which class it names) and 80% on an
  anonymous caption of their class ("a photo of a greek kind 3."): the image tower learns to tell
  the classes apart, as CLIP tells aircraft variants apart without knowing their names.

So zero-shot accuracy (all 60 names, before the first task) is clearly above chance on fashion and
shapes, near the chance of guessing within the domain on the others, and every task is learned by
LADA above it (bench/mini_tail.py).

Storage: ``<dir>/lada-mini-<recipe hash>.pt`` (an open_clip state dict) and a sidecar ``.json`` (its
sha256 and size, the recipe, how long it took). ``<dir>`` is ``$LADA_MODEL_DIR``, else
``$XDG_CACHE_HOME/lada/models``, else ``~/.cache/lada/models``. A changed recipe gets a new file; both
files are written to temporary names and renamed; a weights file whose sidecar is missing or does not
match its bytes (a truncated or altered file) is never used: it is rebuilt. A lock file keeps two
processes of one machine from pretraining at once.

Determinism: the recipe's seed fixes the initialisation, the data, the batches and the augmentation,
and its ``threads`` the torch thread count while pretraining: with one torch build the weights are
the same bytes every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lada_core.backbone import OFFLINE_TAG  # noqa: F401  (re-exported: the tag this module serves)
from lada_core.progress import Progress

MODEL = "lada-mini"
ENV_DIR = "LADA_MODEL_DIR"
RECIPE_VERSION = 3
COVERED = ("fashion", "shapes")
"""The mini-tail domains some of whose classes (every ``Recipe.named_stride``-th) the mini CLIP is
pretrained on by name (other images of the same kind, each with its class caption); their other
classes are learned like those of a domain-only domain."""
DOMAIN_ONLY = ("textures", "digits", "greek", "chess", "colours")
"""Domains whose images (other images of the same kind) come without their class name: their target
is every class caption of the domain alike, and an anonymous caption of their class, so the model
learns which captions belong to such an image's domain and how its classes differ, not which name
is which class (like CLIP, which knows an aircraft but not its variant)."""
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


class PretrainError(RuntimeError):
    """The mini CLIP could not be pretrained or stored (one-line message)."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the weights; its hash names the file."""

    model: str = MODEL
    seed: int = 0
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 80
    fashion_images: int = 3000  # drawn (seeded) from the Fashion-MNIST images mini-tail leaves out
    rendered_per_class: int = 500  # rendered domains, from the "pretrain" stream (never a mini-tail image)
    domain_only_per_class: int = 300  # images per class name of a domain-only domain
    covered: tuple[str, ...] = COVERED
    domain_only: tuple[str, ...] = DOMAIN_ONLY
    templates: tuple[str, ...] = TEMPLATES
    shift: int = 2  # augmentation: random translation by up to this many pixels, and horizontal flips
    named_stride: int = 3  # of a covered domain, classes 0, stride, 2 * stride, ... are learned by name
    anonymous_weight: float = 0.8  # share of a domain-only image's target on its anonymous class caption
    anonymous_name: str = "{domain} kind {k}"  # the anonymous class captions' name (k = 1, 2, ...)
    threads: int = 1  # torch threads while pretraining (the bytes depend on it; tiny ops gain nothing from more)
    version: int = RECIPE_VERSION

    def key(self) -> str:
        from lada_core.backbone import model_config
        from lada_core.benchmarks.mini_tail import DOMAINS, SPLIT_SEED
        from lada_core.benchmarks.render import RENDER_VERSION

        blob = {
            "recipe": asdict(self),
            "config": model_config(self.model),
            "classes": DOMAINS,
            "render": RENDER_VERSION,
            "split_seed": SPLIT_SEED,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_RECIPE = Recipe()
RECIPES: dict[str, Recipe] = {MODEL: DEFAULT_RECIPE}
"""The architectures that have offline weights, with their recipe."""


def model_dir() -> Path:
    """Where the weights live: ``$LADA_MODEL_DIR``, else ``$XDG_CACHE_HOME/lada/models``, else
    ``~/.cache/lada/models``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lada" / "models"


def weights_path(recipe: Recipe = DEFAULT_RECIPE, root: str | Path | None = None) -> Path:
    return Path(root or model_dir()) / f"{recipe.model}-{recipe.key()}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path) -> dict[str, Any] | None:
    """The sidecar of ``path`` when both files exist and the weights' size and sha256 match it;
    None otherwise (missing, truncated or altered: such a file is never used)."""
    side = _sidecar(path)
    try:
        meta = json.loads(side.read_text())
        if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            return None
        return dict(meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish_bytes(final: Path, write: Callable[[Path], object]) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path.with_suffix(".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_weights(
    name: str = MODEL,
    recipe: Recipe | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The verified weights file of ``name``'s recipe, pretraining it first when there is none."""
    if recipe is None:
        if name not in RECIPES:
            raise PretrainError(f"no offline pretraining recipe for {name!r} (models with one: {', '.join(RECIPES)})")
        recipe = RECIPES[name]
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    path = weights_path(recipe, root)
    if verified(path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PretrainError(f"cannot create the model folder {path.parent} ({exc.strerror}); set ${ENV_DIR}") from None
    with _lock(path):
        if verified(path):  # another process finished it while we waited
            return path
        if path.exists():
            log(f"{path} does not match its sidecar (truncated or altered): pretraining it again")
        log(f"pretraining the mini CLIP {recipe.model} (once per machine; about two minutes on 2 CPU cores) -> {path}")
        t0, c0 = time.time(), time.process_time()
        state = pretrain(recipe, progress=progress)
        seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
        _publish_bytes(path, lambda p: torch.save(state, p))
        meta = {
            "sha256": _sha256(path), "size": path.stat().st_size, "recipe": asdict(recipe),
            "key": recipe.key(), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "threads": recipe.threads, "torch": torch.__version__,  # the threads it ran on (pretrain sets them)
        }
        _publish_bytes(_sidecar(path), lambda p: p.write_text(json.dumps(meta, indent=1)))
        log(f"mini CLIP pretrained in {seconds:.0f}s: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# The pretraining data and loop


@dataclass
class PretrainData:
    images: np.ndarray  # [N, 32, 32, 3] uint8, already at the model's input size
    labels: np.ndarray  # [N] int64, index into class_names; -1 for a domain-only image
    domains: np.ndarray  # [N] int64, index of the image's domain in DOMAINS
    class_names: list[str]  # every mini-tail class name
    domain_of_class: np.ndarray  # [C] int64
    covered: list[int] = field(default_factory=list)  # indices of the class names learned with their images
    anonymous: np.ndarray | None = None  # [N] int64, index into anonymous_names; -1 for a covered image
    anonymous_names: list[str] = field(default_factory=list)  # "greek kind 3": a class without its name
    anonymous_weight: float = 0.0

    def captions(self) -> list[str]:
        """The names the captions are made of: every mini-tail class name, then the anonymous ones."""
        return [*self.class_names, *self.anonymous_names]

    def targets(self) -> torch.Tensor:
        """[N, C + A] target distribution of every image over :meth:`captions`: one-hot on its class
        (covered images); for a domain-only image, ``1 - anonymous_weight`` spread evenly over the
        class names of its domain and ``anonymous_weight`` on its anonymous class caption."""
        c = len(self.class_names)
        n = len(self.labels)
        same = torch.from_numpy(self.domain_of_class[None, :] == self.domains[:, None]).float()  # [N, C]
        uniform = same / same.sum(1, keepdim=True)
        onehot = torch.zeros(n, c)
        known = torch.from_numpy(self.labels >= 0)
        onehot[known, torch.from_numpy(self.labels[self.labels >= 0])] = 1.0
        real = torch.where(known[:, None], onehot, uniform)
        if not self.anonymous_names:
            return real
        anon = torch.zeros(n, len(self.anonymous_names))
        idx = torch.from_numpy(self.anonymous if self.anonymous is not None else np.full(n, -1))
        has = idx >= 0
        anon[has, idx[has]] = 1.0
        w = self.anonymous_weight * has.float()[:, None]
        return torch.cat([real * (1 - w), anon * w], dim=1)


def pretrain_data(recipe: Recipe, size: int = 32) -> PretrainData:
    """Images and targets of the recipe: none of them is a mini-tail train, val or test image."""
    from PIL import Image

    from lada_core.benchmarks.mini_tail import DOMAINS, fashion_split, hash_seed, load_fashion_mnist
    from lada_core.benchmarks.render import RENDERERS, RenderedImages, balanced_labels

    names: list[str] = []
    offsets: dict[str, int] = {}
    domain_of_class: list[int] = []
    for d, (domain, cls) in enumerate(DOMAINS.items()):
        offsets[domain] = len(names)
        names += cls
        domain_of_class += [d] * len(cls)
    order = list(DOMAINS)
    rng = np.random.default_rng([recipe.seed, 1])
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    domains: list[np.ndarray] = []
    anonymous: list[np.ndarray] = []
    anonymous_names: list[str] = []
    covered: list[int] = []
    for domain in recipe.domain_only:
        if domain not in RENDERERS:
            raise PretrainError(f"recipe has domain-only {domain!r}, which cannot be rendered")
        n_cls = len(RENDERERS[domain][0])
        y = balanced_labels(n_cls, recipe.domain_only_per_class, seed=hash_seed(domain, "pretrain", str(recipe.seed)))
        images.append(RenderedImages(domain, "pretrain", recipe.seed, y).pixels())
        labels.append(np.full(len(y), -1, dtype=np.int64))
        domains.append(np.full(len(y), order.index(domain), dtype=np.int64))
        anonymous.append(np.asarray(y, dtype=np.int64) + len(anonymous_names) if recipe.anonymous_weight > 0 else np.full(len(y), -1, dtype=np.int64))
        if recipe.anonymous_weight > 0:
            anonymous_names += [recipe.anonymous_name.format(domain=domain, k=k + 1) for k in range(n_cls)]
    for domain in recipe.covered:
        if domain == "fashion":
            raw = load_fashion_mnist(splits=("train",))  # never the test file
            xtr, ytr = raw["train"]
            pool = fashion_split(ytr).pretrain
            pick = np.sort(rng.choice(pool, size=min(recipe.fashion_images, pool.size), replace=False))
            px = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")) for a in xtr[pick]])
            y = ytr[pick]
        elif domain in RENDERERS:
            n_cls = len(RENDERERS[domain][0])
            y = balanced_labels(n_cls, recipe.rendered_per_class, seed=hash_seed(domain, "pretrain", str(recipe.seed)))
            px = RenderedImages(domain, "pretrain", recipe.seed, y).pixels()
        else:
            raise PretrainError(f"recipe covers {domain!r}, which has no pretraining images (fashion or a rendered domain)")
        n_cls = len(DOMAINS[domain])
        y = np.asarray(y, dtype=np.int64)
        named = np.arange(n_cls) % recipe.named_stride == 0  # classes 0, stride, 2 * stride, ... by name
        images.append(px)
        labels.append(np.where(named[y], y + offsets[domain], -1))
        domains.append(np.full(len(y), order.index(domain), dtype=np.int64))
        anon_of = np.full(n_cls, -1, dtype=np.int64)  # the unnamed classes: like a domain-only domain
        if recipe.anonymous_weight > 0:
            for k in np.flatnonzero(~named):
                anon_of[k] = len(anonymous_names)
                anonymous_names.append(recipe.anonymous_name.format(domain=domain, k=int(k) + 1))
        anonymous.append(anon_of[y])
        covered += [offsets[domain] + int(k) for k in np.flatnonzero(named)]
    clash = set(anonymous_names) & set(names)
    if clash:
        raise PretrainError(f"anonymous class names {sorted(clash)} are mini-tail class names")
    return PretrainData(
        np.concatenate(images), np.concatenate(labels), np.concatenate(domains), names, np.array(domain_of_class), sorted(covered),
        np.concatenate(anonymous), anonymous_names, recipe.anonymous_weight,
    )


def _normalizer(backbone: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import transforms as T

    norm = next(t for t in backbone.test_transform.transforms if isinstance(t, T.Normalize))
    return torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation (edge padding) and horizontal flip, per image. x: [B, 3, H, W]."""
    b, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, 3, h, w + 2 * shift)
        x = padded.gather(2, rows)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, 3, h, w)
        x = x.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


def _shrink_vocabulary(model: Any, tokens: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
    """Swap ``model``'s token embedding (49408 rows) for one holding only the rows of ``tokens``'
    ids, in ascending order: returns (the full embedding, the sorted ids), or (it, None) where the
    text tower does not pool at the largest token id. Training the small one is the same as training
    the full one (the other rows get no gradient, and the embedding has no weight decay, so AdamW
    leaves them as they are) at a third less cost per step; the remap keeps the order of the ids, so
    the argmax that finds the end-of-text token still finds it. Write the rows back after training."""
    full = getattr(model, "token_embedding", None)
    if not isinstance(full, torch.nn.Embedding) or getattr(model, "text_pool_type", "argmax") != "argmax":
        return full, None
    used = torch.unique(tokens)  # sorted
    small = torch.nn.Embedding(len(used), full.embedding_dim)
    with torch.no_grad():
        small.weight.copy_(full.weight[used])
    model.token_embedding = small
    return full, used


def pretrain(recipe: Recipe, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train ``recipe.model`` from its seeded random init; returns its state dict.

    Loss: for a batch of images x and the captions t_c = f_T(template(c)) of all class names c (one
    template per step, in turn), the cross-entropy of the image-to-caption logits
    ``s * cos(f_I(x), t_c)`` (s = exp(logit_scale), learned, at most 100) towards each image's target
    (its class caption; for an image of an unnamed class, all class captions of its domain alike and
    its anonymous class caption, :meth:`PretrainData.targets`): CLIP's contrastive image-to-text loss
    where every caption of the batch is a class caption. Runs on ``recipe.threads`` torch threads."""

    from lada_core.backbone import load_backbone

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as undo:
        torch.set_num_threads(recipe.threads)
        undo.callback(torch.set_num_threads, threads)
        torch.manual_seed(recipe.seed)
        bb = load_backbone(recipe.model, None)
        model = bb.model
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        data = pretrain_data(recipe, bb.image_size)
        mean, std = _normalizer(bb)
        tokens = torch.stack([bb.tokenizer([t.format(c) for c in data.captions()]) for t in recipe.templates])  # [T, C + A, ctx]
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
        full_embedding, used = _shrink_vocabulary(model, tokens)
        if used is not None:  # train the rows of the captions' tokens only (the others get no gradient)
            tokens = torch.searchsorted(used, tokens)
        targets = data.targets()  # [N, C]
        gen = torch.Generator().manual_seed(recipe.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=recipe.lr
        )

        def lr_at(step: int) -> float:
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        bar = Progress(recipe.steps, f"pretraining {recipe.model}", "step", enabled=progress)
        n = images.shape[0]
        order = torch.randperm(n, generator=gen)
        pos = 0
        running = 0.0
        for step in range(recipe.steps):
            if pos + recipe.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + recipe.batch_size]
            pos += recipe.batch_size
            x = (images[idx].float() / 255.0 - mean) / std  # [B, 3, H, W]
            x = _augment(x, recipe.shift, gen)
            img = model.encode_image(x, normalize=True)  # [B, D]
            txt = model.encode_text(tokens[step % len(recipe.templates)], normalize=True)  # [C, D]
            logits = model.logit_scale.exp() * img @ txt.t()  # [B, C]
            loss = F.cross_entropy(logits, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            value = float(loss.detach())
            running = 0.95 * running + 0.05 * value if step else value
            if not math.isfinite(running):
                raise PretrainError(f"pretraining {recipe.model} diverged at step {step + 1} (loss {running})")
            bar.set_postfix(loss=f"{running:.3f}")
            bar.update(1)
        bar.close()
        if used is not None:
            with torch.no_grad():
                full_embedding.weight[used] = model.token_embedding.weight
            model.token_embedding = full_embedding
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Zero-shot accuracy of a backbone on a benchmark (what Transfer builds on)


def zero_shot(backbone: Any, benchmark: Any, split: str = "test", template: str = "a photo of a {}.", batch_size: int = 512) -> dict[str, float]:
    """Per task: the share (%) of ``split`` images whose most similar caption, among ALL class names
    of the benchmark, is their own (the X-TAIL rule before the first task)."""
    names = benchmark.class_names
    with torch.no_grad():
        text = backbone.model.encode_text(backbone.tokenizer([template.format(c.replace("_", " ")) for c in names]), normalize=True)
    out: dict[str, float] = {}
    for task, offset in zip(benchmark.tasks, benchmark.offsets):
        src = getattr(task, split)
        if src is None:
            continue
        correct = 0
        for i in range(0, len(src), batch_size):
            ids = range(i, min(i + batch_size, len(src)))
            x = torch.stack([backbone.test_transform(src.load(j)) for j in ids])
            with torch.no_grad():
                feats = F.normalize(backbone.encode_images(x), dim=-1)
            pred = (feats @ text.float().t()).argmax(1).numpy()
            correct += int((pred == np.asarray(src.labels)[list(ids)] + offset).sum())
        out[task.name] = 100.0 * correct / len(src)
    return out


def with_steps(recipe: Recipe, steps: int, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with fewer steps (and other changes): for tests and experiments."""
    return replace(recipe, steps=steps, **changes)
