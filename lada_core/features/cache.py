"""Image -> feature cache: content-addressed, immutable, resumable, memory-mapped on read.

One folder per split (``train``, ``val``, ``test``), each under its own key, so that each split is
encoded only when something needs it (a sweep tuning on validation data never encodes, nor opens,
the test images). Layout under ``<cache_root>/``::

    <split key>/manifest.json               one split of every task; written last: its presence means complete
    <split key>/<task>/<split>-NNNNN.parquet   shards (sample, label, task, view, embedding: fixed_size_list<f16>[D])
    <split key>/<task>/<split>.emb.npy      [rows, D] float16, consolidated for memory-mapped reading
    <split key>/<task>/<split>.meta.npy     [rows, 3] int32 (sample, label, view)
    <bundle key>/bundle.json                the handle of a set of splits: their keys, the tasks, the template

A split's key = hash of (cache format version, backbone, pretrained tag, transforms, the split's
spec: benchmark and task names, classes and the split's content fingerprints; for ``train`` also the
view count and the augmentation seed), so any changed input gets a new folder. A bundle's key =
hash of its splits' keys (:func:`bundle_key`). Rows are sample-major: the train split holds ``V + 1``
rows per image, view 0 the test transform and views 1..V augmented (V = 0 for datasets without
augmentation); the val and test splits hold view 0 only.

Scale: extraction streams one shard at a time (``data.shard_rows`` rows; at most one shard of features
and one batch of pixels in memory, whatever the dataset size), and the consolidated arrays are written
by appending shard after shard (no whole-dataset array is ever built, not even a memory map).

Robustness: every file is written under a temporary name (``*.tmp-<host>-<pid>``), fsynced and
renamed; ``manifest.json`` comes last. Each shard records which rows it holds (Parquet key-value
metadata) and carries page checksums, so an interrupted extraction resumes from its finished shards
and never reuses a shard of another layout. Augmentation is seeded per (image, view), so a resumed
run writes the same bytes as an uninterrupted one.

Integrity: :func:`quick_check` (every :func:`~lada_core.features.bundle.load_bundle`) checks the
manifest and every array's header, shape and exact file size: truncation and missing files are
caught. Reusing a cache through :func:`build_cache` / ``ensure_cache`` also verifies the sha256 of
every array (``verify=True``), so bit flips are caught before a run starts; :func:`check_cache`
(``lada-cache --check``) verifies everything: manifest, every shard (decoded, row count, sha256) and
every array.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.benchmarks.base import Benchmark, DataError, Task

CACHE_VERSION = 3  # 2: seed in the key, shard row metadata, page checksums, streamed arrays; 3: one key per split
MANIFEST = "manifest.json"
BUNDLE = "bundle.json"
SPLITS = ("train", "val", "test")


class CacheError(DataError):
    """A cache that is incomplete or corrupt; the message names the file."""


def cache_key(backbone: str, pretrained: str | None, transform_desc: str, split_spec: dict[str, Any], views: int, seed: int = 0) -> str:
    """The content address of one split's cache (``split_spec``: :meth:`Benchmark.split_spec`):
    everything that changes its bytes, nothing that does not (batch size, shard size, device and worker
    counts are left out; views and seed only for ``train``, the one split with augmented views)."""
    train = split_spec.get("split") == "train"
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "backbone": backbone,
            "pretrained": pretrained,
            "transform": transform_desc,
            "benchmark": split_spec,
            "views": views if train else 0,
            "seed": seed if train else 0,  # seeds the augmented views
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def bundle_key(split_keys: dict[str, str]) -> str:
    """The key of a bundle: the hash of its splits' keys."""
    blob = json.dumps({"version": CACHE_VERSION, "splits": split_keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _tmp_name(final: Path) -> Path:
    """A temporary name next to ``final``, unique per writer (host and pid: shared storage)."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """fsync then rename ``tmp`` onto ``final`` (atomic). A writer racing another one on the same cache
    may find its temporary file swept away by the other's finalization; the final file is then there."""
    try:
        _fsync(tmp)
        os.replace(tmp, final)
    except FileNotFoundError:
        if not final.is_file():
            raise


def _sweep_tmp(root: Path) -> None:
    """Remove temporary files left by interrupted writers (``*.tmp-*`` anywhere under ``root``)."""
    for p in root.rglob("*.tmp-*"):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------------
# Planning: the work as pure data (picklable jobs, one per shard)


@dataclass(frozen=True)
class ShardJob:
    task_index: int
    task_name: str
    split: str
    shard: int
    start: int  # first row (sample-major rows: sample * views_per_sample + view)
    stop: int
    views_per_sample: int
    path: str  # final shard path
    seed: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _views_per_sample(task: Task, split: str, views: int) -> int:
    return 1 + views if (split == "train" and task.augment and views > 0) else 1


def _source(task: Task, split: str) -> Any:
    src = task.split(split)
    if src is None:
        raise CacheError(f"task {task.name} has no {split} images")
    return src


def plan_jobs(benchmark: Benchmark, root: Path, views: int, shard_rows: int, seed: int, splits: Sequence[str] = ("train", "test")) -> list[ShardJob]:
    """The shard jobs of ``splits``; ``root`` is one split's folder when one split is planned, else
    a folder under which each split's shards go to ``<root>/<task>/<split>-NNNNN.parquet``."""
    jobs = []
    for ti, task in enumerate(benchmark.tasks):
        for split in splits:
            src = _source(task, split)
            vps = _views_per_sample(task, split, views)
            total = len(src) * vps
            per = max(vps, (shard_rows // vps) * vps)  # whole samples per shard
            for si, start in enumerate(range(0, total, per)):
                stop = min(total, start + per)
                path = root / task.name / f"{split}-{si:05d}.parquet"
                jobs.append(ShardJob(ti, task.name, split, si, start, stop, vps, str(path), seed))
    return jobs


# --------------------------------------------------------------------------------------------------
# Extraction


class _ShardItems:
    """Dataset of one shard's rows: image ``row // vps`` under view ``row % vps``."""

    def __init__(self, job: ShardJob, task: Task, train_tf: Callable, test_tf: Callable, plain_tf: Callable) -> None:
        self.job = job
        self.src = _source(task, job.split)
        self.augment = task.augment
        self.train_tf, self.test_tf, self.plain_tf = train_tf, test_tf, plain_tf
        self._last: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return self.job.rows

    def __getitem__(self, k: int) -> Any:
        import torch

        row = self.job.start + k
        sample, view = divmod(row, self.job.views_per_sample)
        if self._last is None or self._last[0] != sample:
            self._last = (sample, self.src.load(sample))
        img = self._last[1]
        if view == 0:
            return self.test_tf(img)
        # Seed per (image, view): the same bytes whatever the batching, workers or resumption.
        # The transforms draw from the CPU generator only: seeding just that one keeps CUDA out of it.
        torch.default_generator.manual_seed((self.job.seed * 1_000_003 + self.job.task_index * 10_007 + sample) * 131 + view)
        return self.train_tf(img)


def _shard_metadata(job: ShardJob) -> dict[bytes, bytes]:
    """What a shard holds, stored in its Parquet key-value metadata (checked on resume)."""
    return {
        b"lada.task": str(job.task_index).encode(),
        b"lada.split": job.split.encode(),
        b"lada.rows": f"{job.start}:{job.stop}".encode(),
        b"lada.views_per_sample": str(job.views_per_sample).encode(),
        b"lada.seed": str(job.seed).encode(),
    }


def _one_line_data_error(exc: DataError) -> DataError:
    """A DataError re-raised by a DataLoader worker carries the worker's traceback in its message:
    keep only the original one-line message (it names the file)."""
    msg = str(exc)
    if "Traceback" not in msg:
        return exc
    last = [line for line in msg.splitlines() if line.strip()][-1]
    return DataError(last.split("Error: ", 1)[-1] if "Error: " in last else last)


def encode_shard(job: ShardJob, task: Task, backbone: Any, device: Any, batch_size: int, num_workers: int = 0, on_batch: Callable[[int], None] | None = None) -> None:
    """Encode one shard (``job.rows`` rows, in batches of ``batch_size``; fp16 autocast on CUDA) and
    write it atomically: temporary name, fsync, rename. Memory: one shard of features."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    items = _ShardItems(job, task, backbone.train_transform, backbone.test_transform, backbone.plain_transform)
    use_cuda = device.type == "cuda"
    dataset: Any = items
    loader: Any = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, pin_memory=use_cuda)
    d = backbone.embed_dim
    emb = np.empty((job.rows, d), np.float16)
    filled = 0
    try:
        for pixels in loader:
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_cuda):
                feats = backbone.model.encode_image(pixels.to(device, non_blocking=True))
            n = feats.shape[0]
            emb[filled : filled + n] = feats.float().cpu().numpy()
            filled += n
            if on_batch:
                on_batch(n)
    except DataError as exc:
        raise _one_line_data_error(exc) from None
    if filled != job.rows:  # pragma: no cover - a source whose length changed under us
        raise CacheError(f"shard {job.path}: encoded {filled} rows, expected {job.rows}")
    rows = np.arange(job.start, job.stop)
    sample, view = np.divmod(rows, job.views_per_sample)
    labels = np.asarray(items.src.labels, dtype=np.int32)[sample]
    table = pa.table(
        {
            "sample": pa.array(sample.astype(np.int64)),
            "label": pa.array(labels),
            "task": pa.array(np.full(len(rows), job.task_index, np.int16)),
            "view": pa.array(view.astype(np.int8)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
        }
    ).replace_schema_metadata(_shard_metadata(job))
    final = Path(job.path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    pq.write_table(table, tmp, compression="zstd", write_page_checksum=True, use_dictionary=["sample", "label", "task", "view"])
    _publish(tmp, final)


def read_shard(path: Path, expect_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one shard -> (embeddings ``[rows, D]`` float16, meta ``[rows, 3]`` int32). A shard that
    cannot be read or has the wrong row count raises CacheError naming the file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, page_checksum_verification=True)
        emb_col = table.column("embedding").combine_chunks()
        d = emb_col.type.list_size
        emb = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(-1, d)
        meta = np.stack([table.column(c).to_numpy().astype(np.int32) for c in ("sample", "label", "view")], axis=1)
    except FileNotFoundError:
        raise CacheError(f"cache shard missing: {path}") from None
    except Exception as exc:  # pyarrow raises several types for truncated or garbled files
        raise CacheError(f"corrupt cache shard {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if expect_rows is not None and emb.shape[0] != expect_rows:
        raise CacheError(f"corrupt cache shard {path}: {emb.shape[0]} rows, expected {expect_rows}")
    return emb, meta


def _shard_ok(job: ShardJob) -> bool:
    """A finished shard of exactly this job (rows, views, seed), e.g. from an interrupted run."""
    p = Path(job.path)
    if not p.is_file():
        return False
    try:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(p)
        return f.metadata.num_rows == job.rows and (f.schema_arrow.metadata or {}) == _shard_metadata(job)
    except Exception:
        return False


@dataclass
class CacheInfo:
    """Where a bundle is (``path``: its folder holding ``bundle.json``; ``key``: the bundle's key),
    whether every split was found already built, and each split's own folder (``splits``)."""

    path: Path
    key: str
    reused: bool
    seconds: float = 0.0
    images: int = 0
    splits: dict[str, Path] = field(default_factory=dict)


@dataclass
class BuildContext:
    """What a job runner needs besides the jobs (all picklable)."""

    benchmark: Benchmark
    backbone_name: str
    pretrained: str | None
    model_config_dir: str | None
    device: str
    batch_size: int
    num_workers: int = 0


JobRunner = Callable[[Sequence[ShardJob], BuildContext], None]


def run_jobs_locally(jobs: Sequence[ShardJob], ctx: BuildContext, backbone: Any = None, progress: bool = True) -> None:
    """Encode the jobs in this process, with a progress bar (images/s, ETA) on stderr."""
    from lada_core.backbone import load_backbone, resolve_device

    if not jobs:
        return
    device = resolve_device(ctx.device)
    if backbone is None:
        backbone = load_backbone(ctx.backbone_name, ctx.pretrained, device=device, model_config_dir=ctx.model_config_dir)
    else:
        backbone.model.to(device)
    total = sum(j.rows for j in jobs)
    bar = _progress(total, progress)
    try:
        for job in jobs:
            encode_shard(job, ctx.benchmark.tasks[job.task_index], backbone, device, ctx.batch_size, ctx.num_workers, bar.update)
    finally:
        bar.close()


def _progress(total: int, enabled: bool) -> Any:
    from lada_core.progress import Progress

    return Progress(total, "encoding", "img", units="images", enabled=enabled)


def build_cache(
    benchmark: Benchmark,
    backbone_name: str,
    pretrained: str | None,
    cache_root: str | Path,
    views: int = 10,
    shard_rows: int = 8192,
    batch_size: int = 256,
    device: str = "auto",
    model_config_dir: str | None = None,
    template: str = "a photo of a {}.",
    seed: int = 0,
    run_jobs: JobRunner | None = None,
    progress: bool = True,
    backbone: Any = None,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
    verify: bool = True,
    splits: Sequence[str] = ("train", "test"),
) -> CacheInfo:
    """Build (or find) the cache of ``splits`` of ``benchmark`` (each split in its own folder, under
    its own key) and the bundle that names them; return where the bundle is. Only the splits asked
    for are read or encoded. Resumes a partial build.

    A found split is checked before it is reused (:func:`quick_check`, and with ``verify`` the sha256
    of every consolidated array); a damaged one raises :class:`CacheError` naming the file."""
    from lada_core.backbone import load_backbone

    log = log or (lambda m: print(m, file=sys.stderr))
    splits = tuple(dict.fromkeys(splits))
    bad = [sp for sp in splits if sp not in SPLITS]
    if bad or "train" not in splits:
        raise CacheError(f"cache splits must include train and be among {', '.join(SPLITS)}, got {', '.join(splits)}")
    if backbone is None:
        backbone = load_backbone(backbone_name, pretrained, device="cpu", model_config_dir=model_config_dir)
    try:
        keys = {sp: cache_key(backbone_name, pretrained, backbone.transform_desc, benchmark.split_spec(sp), views, seed) for sp in splits}
    except DataError as exc:
        raise CacheError(str(exc)) from None
    roots = {sp: Path(cache_root) / k for sp, k in keys.items()}
    missing = []
    for sp in splits:
        if (roots[sp] / MANIFEST).is_file():
            m = quick_check(roots[sp])
            if verify:
                verify_arrays(roots[sp], m)
            log(f"feature cache: reusing {roots[sp]} ({sp}, key {keys[sp]})")
        else:
            missing.append(sp)
    t0 = time.time()  # CacheInfo.seconds: encoding + consolidation (not model loading or planning)
    images = _build_splits(benchmark, missing, roots, keys, backbone, views, shard_rows, seed, template, pretrained, backbone_name,
                           BuildContext(benchmark, backbone_name, pretrained, model_config_dir, device, batch_size, num_workers),
                           run_jobs, progress, log)
    secs = time.time() - t0
    bkey = _write_bundle(Path(cache_root), keys, benchmark, backbone, views, template, pretrained, backbone_name)
    if missing:
        log(f"feature cache: done in {secs:.1f}s -> {Path(cache_root) / bkey}")
    return CacheInfo(Path(cache_root) / bkey, bkey, not missing, secs if missing else 0.0, images, roots)


def _build_splits(benchmark: Benchmark, missing: Sequence[str], roots: dict[str, Path], keys: dict[str, str], backbone: Any, views: int,
                  shard_rows: int, seed: int, template: str, pretrained: str | None, backbone_name: str, ctx: BuildContext,
                  run_jobs: JobRunner | None, progress: bool, log: Callable[[str], None]) -> int:
    """Encode the ``missing`` splits (one batch of shard jobs for all of them), then consolidate each
    split and write its manifest. Returns the number of rows encoded now."""
    if not missing:
        return 0
    jobs = {sp: plan_jobs(benchmark, roots[sp], views, shard_rows, seed, (sp,)) for sp in missing}
    for sp in missing:
        roots[sp].mkdir(parents=True, exist_ok=True)
    todo = [j for sp in missing for j in jobs[sp] if not _shard_ok(j)]
    total = sum(len(js) for js in jobs.values())
    total_rows = sum(j.rows for js in jobs.values() for j in js)
    log(
        f"feature cache: building {', '.join(f'{sp} {roots[sp]} (key {keys[sp]})' for sp in missing)}: {len(benchmark.tasks)} tasks, "
        f"{total_rows} images x views, {total} shards" + (f", resuming ({total - len(todo)} shards already done)" if total > len(todo) else "")
    )
    if run_jobs is None:
        run_jobs_locally(todo, ctx, backbone=backbone, progress=progress)
    else:
        run_jobs(todo, ctx)
    for sp in missing:
        _finalize(roots[sp], keys[sp], sp, benchmark, jobs[sp], backbone, views, template, pretrained, backbone_name)
    return sum(j.rows for j in todo)


def _tasks_meta(benchmark: Benchmark) -> list[dict[str, Any]]:
    return [{"name": t.name, "class_names": t.class_names, "epochs": t.epochs, "augment": t.augment} for t in benchmark.tasks]


def _write_bundle(cache_root: Path, keys: dict[str, str], benchmark: Benchmark, backbone: Any, views: int, template: str,
                  pretrained: str | None, backbone_name: str) -> str:
    """Write ``<cache_root>/<bundle key>/bundle.json`` (once; atomically) and return the bundle key.
    The key hashes the split keys and what the bundle adds (task schedule, prompt template)."""
    tasks = _tasks_meta(benchmark)
    bkey = bundle_key({**keys, "tasks": json.dumps(tasks, sort_keys=True), "template": template})
    root = cache_root / bkey
    if (root / BUNDLE).is_file():
        return bkey
    root.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": CACHE_VERSION, "key": bkey, "splits": keys, "backbone": backbone_name, "pretrained": pretrained,
        "transform": backbone.transform_desc, "views": views, "embed_dim": backbone.embed_dim, "template": template,
        "benchmark": benchmark.name, "tasks": tasks,
    }
    tmp = _tmp_name(root / BUNDLE)
    tmp.write_text(json.dumps(doc, indent=1))
    _publish(tmp, root / BUNDLE)
    return bkey


def read_bundle(root: str | Path) -> dict[str, Any]:
    """The bundle manifest of ``root`` (a folder holding ``bundle.json``); the split folders it names
    are ``root.parent / key``. Raises :class:`CacheError` naming the file."""
    path = Path(root) / BUNDLE
    if not path.is_file():
        if (Path(root) / MANIFEST).is_file():
            raise CacheError(f"{root} is one split of a feature cache, not a bundle (open the folder lada-cache printed)")
        raise CacheError(f"no feature cache at {root} ({BUNDLE} not found)")
    return _load_manifest(path, "bundle manifest", lambda m: isinstance(m.get("splits"), dict))


def _load_manifest(path: Path, what: str, valid: Any) -> dict[str, Any]:
    """The JSON object of a manifest file of this cache version that ``valid`` accepts, else a
    :class:`CacheError` naming the file."""
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"corrupt {what} {path}: {exc}") from None
    if not isinstance(m, dict) or m.get("version") != CACHE_VERSION or not valid(m):
        raise CacheError(f"corrupt or incompatible {what} {path}")
    return m


def bundle_splits(root: str | Path) -> dict[str, Path]:
    """``{split: folder}`` of the bundle at ``root``."""
    return {sp: Path(root).parent / k for sp, k in read_bundle(root)["splits"].items()}


class _NpyWriter:
    """Write a C-order ``.npy`` file by appending row blocks, hashing on the fly (no array in memory,
    no memory map: dirty pages of a map would count against the process for the whole dataset)."""

    def __init__(self, final: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        self.final, self.dtype, self.shape = final, np.dtype(dtype), shape
        self.tmp = _tmp_name(final)
        self.sha = hashlib.sha256()
        self.rows = 0
        self.f = open(self.tmp, "wb")
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        self._put(header.getvalue())

    def _put(self, b: Any) -> None:
        self.sha.update(b)
        self.f.write(b)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise CacheError(f"{self.final}: block of shape {block.shape}, expected rows of {self.shape[1:]}")
        self._put(block.data.cast("B"))
        self.rows += block.shape[0]

    def close(self) -> str:
        self.f.close()
        if self.rows != self.shape[0]:
            raise CacheError(f"{self.final}: wrote {self.rows} rows, expected {self.shape[0]}")
        _publish(self.tmp, self.final)
        return self.sha.hexdigest()


def _finalize(root: Path, key: str, split: str, benchmark: Benchmark, jobs: list[ShardJob], backbone: Any, views: int, template: str,
              pretrained: str | None, backbone_name: str) -> None:
    """Consolidate one split's shards into memory-mappable arrays (streamed: one shard in memory at
    a time), then write the split's manifest last."""
    d = backbone.embed_dim
    tasks_meta = _tasks_meta(benchmark)
    for ti, (task, entry) in enumerate(zip(benchmark.tasks, tasks_meta)):
        sj = sorted((j for j in jobs if j.task_index == ti and j.split == split), key=lambda j: j.start)
        rows = sum(j.rows for j in sj)
        emb_path = root / task.name / f"{split}.emb.npy"
        meta_path = root / task.name / f"{split}.meta.npy"
        emb_w = _NpyWriter(emb_path, np.float16, (rows, d))
        meta_w = _NpyWriter(meta_path, np.int32, (rows, 3))
        shards = []
        for j in sj:
            emb, meta = read_shard(Path(j.path), j.rows)
            if emb.shape[1] != d:
                raise CacheError(f"corrupt cache shard {j.path}: dimension {emb.shape[1]}, expected {d}")
            emb_w.append(emb)
            meta_w.append(meta)
            del emb, meta
            shards.append({"file": Path(os.path.relpath(j.path, root)).as_posix(), "rows": j.rows, "bytes": Path(j.path).stat().st_size, "sha256": sha256_file(Path(j.path))})
        emb_sha, meta_sha = emb_w.close(), meta_w.close()
        src = _source(task, split)
        entry[split] = {
            "samples": len(src),
            "rows": rows,
            "views_per_sample": sj[0].views_per_sample if sj else 1,
            "shards": shards,
            "emb": {"file": Path(os.path.relpath(emb_path, root)).as_posix(), "sha256": emb_sha},
            "meta": {"file": Path(os.path.relpath(meta_path, root)).as_posix(), "sha256": meta_sha},
        }
    manifest = {
        "version": CACHE_VERSION,
        "key": key,
        "split": split,
        "splits": [split],
        "backbone": backbone_name,
        "pretrained": pretrained,
        "transform": backbone.transform_desc,
        "views": views,
        "seed": jobs[0].seed if jobs else 0,
        "embed_dim": d,
        "template": template,
        "benchmark": benchmark.name,
        "tasks": tasks_meta,
    }
    _sweep_tmp(root)  # leftovers of interrupted writers: the finished cache holds only its own files
    tmp = _tmp_name(root / MANIFEST)
    tmp.write_text(json.dumps(manifest, indent=1))
    _publish(tmp, root / MANIFEST)


# --------------------------------------------------------------------------------------------------
# Checking


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        if Path(root).is_dir() and any(Path(root).rglob("*.parquet")):
            raise CacheError(f"incomplete feature cache {root}: no {MANIFEST} (an extraction was interrupted; run lada-cache again to resume)")
        raise CacheError(f"no feature cache at {root} ({MANIFEST} not found)")
    return _load_manifest(path, "manifest", lambda m: "tasks" in m and isinstance(m.get("splits"), list))


def quick_check(root: Path) -> dict[str, Any]:
    """Cheap check done on every load (no data read): the manifest, every shard's presence and exact
    size, and the consolidated arrays' headers, shapes and exact sizes. Catches missing files,
    truncation and interrupted builds; bit flips need the hashes (:func:`verify_arrays`, :func:`check_cache`)."""
    m = read_manifest(root)
    for t in m["tasks"]:
        for split in m["splits"]:
            s = t[split]
            for sh in s["shards"]:
                p = Path(root) / sh["file"]
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    raise CacheError(f"cache shard missing: {p}") from None
                if "bytes" in sh and size != sh["bytes"]:
                    raise CacheError(f"corrupt cache shard {p}: {size} bytes, expected {sh['bytes']} (truncated or overwritten)")
            for kind, width in (("emb", m["embed_dim"]), ("meta", 3)):
                p = Path(root) / s[kind]["file"]
                try:
                    arr = np.load(p, mmap_mode="r")
                except FileNotFoundError:
                    raise CacheError(f"cache file missing: {p}") from None
                except Exception as exc:
                    raise CacheError(f"corrupt cache file {p}: {str(exc).splitlines()[0]}") from None
                if arr.shape != (s["rows"], width):
                    raise CacheError(f"corrupt cache file {p}: shape {arr.shape}, expected {(s['rows'], width)}")
                size = p.stat().st_size
                if size != arr.offset + arr.nbytes:
                    raise CacheError(f"corrupt cache file {p}: {size} bytes, expected {arr.offset + arr.nbytes}")
                del arr
    return m


def verify_arrays(root: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """sha256 of every consolidated array against the manifest (a sequential read of the arrays; the
    shards are not read). Raises :class:`CacheError` naming the first damaged file."""
    root = Path(root)
    m = manifest if manifest is not None else read_manifest(root)
    for t in m["tasks"]:
        for split in m["splits"]:
            for kind in ("emb", "meta"):
                p = root / t[split][kind]["file"]
                try:
                    ok = sha256_file(p) == t[split][kind]["sha256"]
                except FileNotFoundError:
                    raise CacheError(f"cache file missing: {p}") from None
                if not ok:
                    raise CacheError(f"corrupt cache file {p}: sha256 differs from {root / MANIFEST} (run lada-cache --check {root}; delete the folder to rebuild)")


def check_cache(root: str | Path) -> list[str]:
    """Full verification: manifest, every shard (readable, row count, sha256) and every array
    (sha256). Returns the list of problems (empty when the cache is sound)."""
    root = Path(root)
    if not root.exists():
        return [f"no feature cache at {root} (folder not found)"]
    if (root / BUNDLE).is_file():  # a bundle: check every split it names
        try:
            return [line for p in bundle_splits(root).values() for line in check_cache(p)]
        except CacheError as exc:
            return [str(exc)]
    if not (root / MANIFEST).is_file() and root.is_dir():
        # A cache root (the folder holding <key>/ split folders and bundles): check every split in it.
        own_shards = any(root.glob("*/*.parquet"))
        subs = sorted(p for p in root.iterdir() if p.is_dir() and ((p / MANIFEST).is_file() or any(p.glob("*/*.parquet"))))
        if subs and not own_shards:
            return [line for p in subs for line in check_cache(p)]
    try:
        m = read_manifest(root)
    except CacheError as exc:
        return [str(exc)]
    problems = []
    for t in m["tasks"]:
        for split in m["splits"]:
            s = t[split]
            for sh in s["shards"]:
                p = root / sh["file"]
                if not p.is_file():
                    problems.append(f"missing shard {p}")
                    continue
                try:
                    read_shard(p, sh["rows"])
                except CacheError as exc:
                    problems.append(str(exc))
                    continue
                if sha256_file(p) != sh["sha256"]:
                    problems.append(f"hash mismatch in shard {p} (sha256 differs from the manifest)")
            for kind in ("emb", "meta"):
                p = root / s[kind]["file"]
                if not p.is_file():
                    problems.append(f"missing array {p}")
                elif sha256_file(p) != s[kind]["sha256"]:
                    problems.append(f"hash mismatch in array {p} (sha256 differs from the manifest)")
    if not problems:
        try:
            quick_check(root)
        except CacheError as exc:
            problems.append(str(exc))
    return problems
