"""Image -> feature cache: content-addressed, immutable, resumable, memory-mapped on read.

Layout under ``<cache_root>/<key>/``::

    manifest.json                       written last: its presence means the cache is complete
    <task>/<split>-NNNNN.parquet        shards (sample, label, task, view, embedding: fixed_size_list<f16>[D])
    <task>/<split>.emb.npy              [rows, D] float16, consolidated for memory-mapped reading
    <task>/<split>.meta.npy             [rows, 3] int32 (sample, label, view)

``key`` = hash of (cache format version, backbone, pretrained tag, transforms, benchmark spec, view
count, augmentation seed), so any changed input gets a new folder. Rows are sample-major: the train
split holds ``V + 1`` rows per image, view 0 the test transform and views 1..V augmented (V = 0 for
datasets without augmentation); the test split holds view 0 only.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.benchmarks.base import Benchmark, DataError, Task

CACHE_VERSION = 2  # 2: seed in the key, shard row metadata, page checksums, streamed arrays
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


class CacheError(DataError):
    """A cache that is incomplete or corrupt; the message names the file."""


def cache_key(backbone: str, pretrained: str | None, transform_desc: str, benchmark_spec: dict[str, Any], views: int, seed: int = 0) -> str:
    """The content address of a cache: everything that changes its bytes, nothing that does not
    (batch size, shard size, device and worker counts are left out)."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "backbone": backbone,
            "pretrained": pretrained,
            "transform": transform_desc,
            "benchmark": benchmark_spec,
            "views": views,
            "seed": seed,  # seeds the augmented views
        },
        sort_keys=True,
    )
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


def plan_jobs(benchmark: Benchmark, root: Path, views: int, shard_rows: int, seed: int) -> list[ShardJob]:
    jobs = []
    for ti, task in enumerate(benchmark.tasks):
        for split in SPLITS:
            src = task.train if split == "train" else task.test
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
        self.src = task.train if job.split == "train" else task.test
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
    path: Path
    key: str
    reused: bool
    seconds: float = 0.0
    images: int = 0


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
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encoding", disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


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
) -> CacheInfo:
    """Build (or find) the cache of ``benchmark`` and return where it is. Resumes a partial build.

    A found cache is checked before it is reused (:func:`quick_check`, and with ``verify`` the sha256
    of every consolidated array); a damaged one raises :class:`CacheError` naming the file."""
    from lada_core.backbone import load_backbone

    log = log or (lambda m: print(m, file=sys.stderr))
    if backbone is None:
        backbone = load_backbone(backbone_name, pretrained, device="cpu", model_config_dir=model_config_dir)
    key = cache_key(backbone_name, pretrained, backbone.transform_desc, benchmark.spec(), views, seed)
    root = Path(cache_root) / key
    if (root / MANIFEST).is_file():
        m = quick_check(root)
        if verify:
            verify_arrays(root, m)
        log(f"feature cache: reusing {root} (key {key})")
        return CacheInfo(root, key, True)
    root.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(benchmark, root, views, shard_rows, seed)
    todo = [j for j in jobs if not _shard_ok(j)]
    done = len(jobs) - len(todo)
    total_rows = sum(j.rows for j in jobs)
    log(
        f"feature cache: building {root} (key {key}): {len(benchmark.tasks)} tasks, {total_rows} images x views, "
        f"{len(jobs)} shards" + (f", resuming ({done} shards already done)" if done else "")
    )
    ctx = BuildContext(benchmark, backbone_name, pretrained, model_config_dir, device, batch_size, num_workers)
    t0 = time.time()  # CacheInfo.seconds: encoding + consolidation (not model loading or planning)
    if run_jobs is None:
        run_jobs_locally(todo, ctx, backbone=backbone, progress=progress)
    else:
        run_jobs(todo, ctx)
    _finalize(root, key, benchmark, jobs, backbone, views, template, pretrained, backbone_name)
    secs = time.time() - t0
    log(f"feature cache: done in {secs:.1f}s -> {root}")
    return CacheInfo(root, key, False, secs, sum(j.rows for j in todo))


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


def _finalize(root: Path, key: str, benchmark: Benchmark, jobs: list[ShardJob], backbone: Any, views: int, template: str, pretrained: str | None, backbone_name: str) -> None:
    """Consolidate shards into memory-mappable arrays (streamed: one shard in memory at a time),
    then write the manifest last."""
    d = backbone.embed_dim
    tasks_meta = []
    for ti, task in enumerate(benchmark.tasks):
        entry: dict[str, Any] = {
            "name": task.name,
            "class_names": task.class_names,
            "epochs": task.epochs,
            "augment": task.augment,
        }
        for split in SPLITS:
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
            src = task.train if split == "train" else task.test
            entry[split] = {
                "samples": len(src),
                "rows": rows,
                "views_per_sample": sj[0].views_per_sample if sj else 1,
                "shards": shards,
                "emb": {"file": Path(os.path.relpath(emb_path, root)).as_posix(), "sha256": emb_sha},
                "meta": {"file": Path(os.path.relpath(meta_path, root)).as_posix(), "sha256": meta_sha},
            }
        tasks_meta.append(entry)
    manifest = {
        "version": CACHE_VERSION,
        "key": key,
        "backbone": backbone_name,
        "pretrained": pretrained,
        "transform": backbone.transform_desc,
        "views": views,
        "seed": jobs[0].seed if jobs else 0,
        "embed_dim": d,
        "template": template,
        "benchmark": benchmark.name,
        "benchmark_spec_hash": benchmark.spec_hash(),
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
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"corrupt manifest {path}: {exc}") from None
    if not isinstance(m, dict) or m.get("version") != CACHE_VERSION or "tasks" not in m:
        raise CacheError(f"corrupt or incompatible manifest {path}")
    return m


def quick_check(root: Path) -> dict[str, Any]:
    """Cheap check done on every load (no data read): the manifest, every shard's presence and exact
    size, and the consolidated arrays' headers, shapes and exact sizes. Catches missing files,
    truncation and interrupted builds; bit flips need the hashes (:func:`verify_arrays`, :func:`check_cache`)."""
    m = read_manifest(root)
    for t in m["tasks"]:
        for split in SPLITS:
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
        for split in SPLITS:
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
    if not (root / MANIFEST).is_file() and root.is_dir():
        # A cache root (the folder holding <key>/ caches): check every cache in it.
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
        for split in SPLITS:
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
