"""Where the wall time of a sweep goes: trial compute against everything else, by cause.

A sweep of N identical trials (the ``lada_paper`` space: no suggested parameter, the same config and
seed in every trial) of a chosen amount of compute (``--epochs``, ``--batch-size``), run by
``lada-sweep`` as a real process on a local Ray (``--local-cpus``, one CPU per trial), with a
sqlite MLflow store. Every trial writes where its time went (``LADA_TRIAL_TIMINGS``, see
``sweeps/trainable.py``); this script adds them up against the sweep's own summary:

- trial compute: the time inside ``run_continual`` (training and evaluation of every task), without
  the per-task reports;
- worker start: a new worker process, from its creation to the trial's first line;
- worker imports: torch, open_clip, lada_core in that process (paid once per process when Tune
  reuses the worker for the next trial);
- cache load / backbone build: opening the memory-mapped feature cache, building the frozen model;
- checkpoint reports: staging each task's checkpoint and ``tune.report`` (upload to the results
  folder, hand-over to the driver);
- idle slots: a CPU slot of the trial phase with no trial in it (Ray scheduling, the driver's loop,
  experiment snapshots, the last trials' tail);
- MLflow: the driver time of the MLflow callback (on the driver, beside the trials).

Shares are of the trial phase (CPU slots x its wall time) and of the whole command (which adds the
set-up: imports, Ray start, cache lookup, the MLflow parent run and the Optuna study).

    .venv/bin/python bench/sweep_overhead.py                      # 4 trials of ~20 s, 2 at a time
    .venv/bin/python bench/sweep_overhead.py --trials 12          # the per-worker start amortised
    .venv/bin/python bench/sweep_overhead.py --no-reuse-actors    # a fresh worker per trial (before)
    .venv/bin/python bench/sweep_overhead.py --stock              # side by side with stock Ray+Optuna+MLflow

``--stock`` also runs the same trials (same space, config, seed, cache, concurrency, actor reuse and
checkpoints) through Ray's own ``OptunaSearch`` and ``MLflowLoggerCallback`` in a plain Tune driver,
in the same invocation, and prints both and their ratio (ours / stock).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sweep_argv(args: argparse.Namespace, work: Path) -> list[str]:
    """The ``lada-sweep`` flags of the benchmark's sweep (the stock driver resolves the same ones)."""
    argv = [
        "--space", "lada_paper", "--tiny-model", "--name", "overhead",
        "--num-samples", str(args.trials), "--local-cpus", str(args.cpus), "--cpus-per-trial", "1",
        "--storage", str(work / "results"), "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}", "--verbose", "0",
        "--time-budget-s", "3600", "--seed", "0",
        "--set", f"data.cache_root={args.cache_root}", "--set", "train.device=cpu", "--set", "data.device=cpu",
        "--set", f"data.shots={args.shots}", "--set", "data.views=2",
        "--set", f"optim.epochs={args.epochs}", "--set", f"optim.batch_size={args.batch_size}",
    ]
    return argv + (["--no-reuse-actors"] if args.no_reuse_actors else [])


def _launch(cmd: list[str], work: Path, what: str) -> tuple[subprocess.CompletedProcess[str], list[dict], float]:
    """Run one sweep process with per-trial timings on; its result, the timing records and its wall time."""
    timings = work / "timings"
    env = dict(os.environ, LADA_TRIAL_TIMINGS=str(timings), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    t0 = time.time()
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"{what} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    records = [json.loads(line) for f in sorted(timings.glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
    return res, records, wall


def run(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict], float]:
    _, records, wall = _launch([sys.executable, "-m", "sweeps.run", *sweep_argv(args, work)], work, "the sweep")
    summary = json.loads((work / "results" / "overhead" / "summary.json").read_text())
    return summary, records, wall


def report(summary: dict, records: list[dict], process_wall: float, label: str) -> dict[str, float]:
    n = len(records)
    conc = summary["concurrency"]
    fit = summary["fit_wall_s"]
    capacity = conc * fit
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["enter"]):
        by_pid[r["pid"]].append(r)
    t_fit = summary.get("t_fit", 0.0)
    # A worker started before the trial phase (a preloaded idle worker of the local Ray) costs the
    # phase only from its start.
    worker_start = sum(rs[0]["enter"] - max(rs[0].get("process_start", rs[0]["enter"]), t_fit) for rs in by_pid.values())
    parts = {
        "worker imports": sum(r.get("imports_s", 0.0) for r in records),
        "trial set-up (config, restore, folders)": sum(r.get("setup_s", 0.0) for r in records),
        "cache load (memory-mapped)": sum(r.get("bundle_s", 0.0) for r in records),
        "backbone build": sum(r.get("backbone_s", 0.0) for r in records),
        "checkpoint reports (stage + tune.report)": sum(r.get("report_s", 0.0) for r in records),
    }
    compute = sum(r["run_s"] - r.get("report_s", 0.0) - r.get("bundle_s", 0.0) - r.get("backbone_s", 0.0) for r in records)
    in_trials = sum(r["exit"] - r["enter"] for r in records)
    after_run = in_trials - compute - sum(parts.values())  # the trainable's own tail (clean-up)
    parts["trial wrap-up"] = max(0.0, after_run)
    parts = {"worker start (new process)": worker_start, **parts}
    idle = max(0.0, capacity - in_trials - worker_start)
    t_fit, t_end = summary.get("t_fit"), summary.get("t_end")
    if t_fit is not None and t_end is not None:
        firsts = [max(rs[0].get("process_start", rs[0]["enter"]), t_fit) for rs in by_pid.values()]
        ramp = sum(max(0.0, f - t_fit) for f in sorted(firsts)[:conc])
        between = sum(max(0.0, b["enter"] - a["exit"]) for rs in by_pid.values() for a, b in zip(rs, rs[1:]))
        lasts = sorted((rs[-1]["exit"] for rs in by_pid.values()), reverse=True)[:conc]
        tail = sum(max(0.0, t_end - x) for x in lasts)
        parts["idle: fit start -> first worker process"] = ramp
        parts["idle: between trials on a worker (Tune's hand-over)"] = between
        parts["idle: last trials' tail and end of fit"] = tail
        parts["idle: other (new workers after the first ones, unbalanced slots)"] = max(0.0, idle - ramp - between - tail)
    else:
        parts["idle slots (scheduling, driver loop, snapshots, tail)"] = idle
    per_trial = compute / max(1, n)
    workers = []
    for pid, rs in by_pid.items():
        start = rs[0].get("process_start", rs[0]["enter"]) - t_fit
        workers.append(f"pid {pid}: process started at {start:+.1f} s, first trial at "
                       f"{rs[0]['enter'] - t_fit:+.1f} s, {len(rs)} trials")
    print(f"\n== {label}: {n} identical trials, {conc} at a time, {len(by_pid)} worker processes ==")
    print(f"trial compute: {per_trial:.1f} s per trial (sum {compute:.1f} s)")
    print("workers (times from the start of the trial phase): " + "; ".join(workers))
    print(f"whole command {process_wall:.1f} s = set-up {summary['setup_s']:.1f} s + trial phase {fit:.1f} s "
          f"(+ {process_wall - summary['wall_s']:.1f} s interpreter start and exit)")
    phases = summary.get("setup_phases_s") or {}
    if phases:
        names = {"inputs": "imports and input checks", "ray_start": "Ray start", "cache": "feature cache (find, verify, open)",
                 "mlflow_parent": "MLflow parent run", "optuna_and_tune": "Optuna study, Tune set-up"}
        print("set-up: " + ", ".join(f"{names.get(k, k)} {v:.1f} s" for k, v in phases.items()))
    print(f"trial phase: {conc} slots x {fit:.1f} s = {capacity:.1f} slot-seconds, of which compute {compute:.1f}")
    print(f"{'cause':66}{'slot-s':>9}{'% of phase':>12}")
    for k, v in parts.items():
        print(f"  {k:64}{v:9.1f}{100 * v / capacity:11.1f}%")
    overhead = max(0.0, 1 - compute / capacity)
    whole = max(0.0, 1 - (compute / conc) / process_wall)
    print(f"  {'total not compute':64}{capacity - compute:9.1f}{100 * overhead:11.1f}%")
    print(f"MLflow callback on the driver (beside the trials): {summary.get('mlflow_callback_s', 0.0):.2f} s, "
          f"{summary.get('mlflow_calls', 0)} calls")
    print(f"share of wall time that is not trial compute: {100 * overhead:.1f}% of the trial phase, "
          f"{100 * whole:.1f}% of the whole command")
    # Paid once per worker process (reused workers pay it once per sweep), against paid by every trial.
    once = parts["worker start (new process)"] + parts["worker imports"] + parts["idle: fit start -> first worker process"]
    once_per_worker = once / max(1, len(by_pid))
    recurring = max(0.0, capacity - compute - once) / max(1, n)
    print(f"once per worker process: {once_per_worker:.1f} s (start, imports); every trial: {recurring:.2f} s of overhead "
          f"for {per_trial:.1f} s of compute ({100 * recurring / max(1e-9, recurring + per_trial):.1f}%)")
    workers = len(by_pid)
    if workers >= n:  # a fresh worker per trial: every trial pays the worker's start and imports
        share = (once_per_worker + recurring) / (once_per_worker + recurring + per_trial)
        print(f"  every trial has its own worker: the share stays about {100 * share:.1f}% whatever the number of trials")
    else:
        for total in (n, 20, 100):
            share = (once + total * recurring) / (once + total * (recurring + per_trial))
            print(f"  projected share of the trial phase with {total:3d} trials on {workers} reused workers: {100 * share:.1f}%")
    return {"overhead_phase": overhead, "overhead_whole": whole, "per_trial": per_trial}


def stock_driver(argv: list[str]) -> int:
    """The same trials through stock Ray Tune: ``OptunaSearch`` and ``MLflowLoggerCallback`` (run in
    its own process by :func:`run_stock`); writes its summary as JSON to stdout's last line."""
    t_start = time.time()
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.cli import build_parser
    from sweeps.objective import OBJECTIVE
    from sweeps.optuna_storage import make_sampler
    from sweeps.plan import prepare
    from sweeps.runner import build_cache
    from sweeps.settings import RunOptions, resolve
    from sweeps.trainable import lada_trainable

    args = build_parser().parse_args(argv)
    args.t0 = t_start
    plan = prepare(resolve(args), RunOptions.from_args(args))
    s, opts = plan.settings, plan.options
    ray.init(num_cpus=opts.local_cpus, include_dashboard=False, log_to_driver=False)
    info, _bundle = build_cache(plan.cache_config, "driver")
    from dataclasses import replace

    spec = replace(plan.spec, cache_path=str(info.path))
    searcher = OptunaSearch(space=plan.space.fn, metric=OBJECTIVE, mode=s.mode, sampler=make_sampler(s.seed),
                            points_to_evaluate=[dict(p) for p in plan.points] or None)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(lada_trainable, spec=spec), {"cpu": s.cpus_per_trial}),
        tune_config=tune.TuneConfig(search_alg=searcher, metric=OBJECTIVE, mode=s.mode, num_samples=s.num_samples,
                                    time_budget_s=opts.time_budget_s, reuse_actors=opts.reuse_actors),
        run_config=tune.RunConfig(name="stock", storage_path=s.storage, verbose=0,
                                  callbacks=[MLflowLoggerCallback(tracking_uri=s.mlflow_uri, experiment_name="stock")],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=opts.max_failures)),
    )
    t_fit = time.time()
    grid = tuner.fit()
    t_end = time.time()
    ray.shutdown()
    done = sum(1 for r in grid if r.error is None)
    print(json.dumps({"t_start": t_start, "t_fit": t_fit, "t_end": t_end, "setup_s": t_fit - t_start, "fit_wall_s": t_end - t_fit,
                      "wall_s": t_end - t_start, "concurrency": min(opts.local_cpus or 1, s.num_samples), "trials_ok": done}))
    return 0


def run_stock(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict], float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stock-driver", *sweep_argv(args, work)]
    res, records, wall = _launch(cmd, work, "the stock sweep")
    return json.loads(res.stdout.strip().splitlines()[-1]), records, wall


def side_by_side(ours: tuple[dict, list[dict], float], stock: tuple[dict, list[dict], float]) -> None:
    """Ours against stock Ray+Optuna+MLflow: wall times, time that is not trial compute, ratios."""
    rows = []
    for label, (summary, records, wall) in (("lada-sweep", ours), ("stock Ray+Optuna+MLflow", stock)):
        compute = sum(r["run_s"] - r.get("report_s", 0.0) - r.get("bundle_s", 0.0) - r.get("backbone_s", 0.0) for r in records)
        capacity = summary["concurrency"] * summary["fit_wall_s"]
        rows.append((label, wall, summary["setup_s"], summary["fit_wall_s"], capacity - compute, len(records)))
    print(f"\n== side by side: the same {rows[0][5]} trials ==")
    print(f"{'':26}{'command s':>11}{'set-up s':>10}{'trials s':>10}{'not compute slot-s':>20}")
    for label, wall, setup, fit, other, _n in rows:
        print(f"{label:26}{wall:11.1f}{setup:10.1f}{fit:10.1f}{other:20.1f}")
    (_, w1, s1, f1, o1, _), (_, w2, s2, f2, o2, _) = rows
    print(f"{'ours / stock':26}{w1 / w2:11.2f}{s1 / max(s2, 1e-9):10.2f}{f1 / f2:10.2f}{o1 / max(o2, 1e-9):20.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--stock-driver"]:
        return stock_driver(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="number of identical trials")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (one per trial)")
    p.add_argument("--epochs", type=int, default=44, help="epochs per task (sets the compute of a trial: about 20 s here)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size (smaller: more steps per epoch)")
    p.add_argument("--shots", type=int, default=8, help="shots per class of mini-tail")
    p.add_argument("--cache-root", default=str(Path(tempfile.gettempdir()) / "lada-bench-cache"), help="feature cache root (kept between runs)")
    p.add_argument("--no-reuse-actors", action="store_true", help="a fresh worker process per trial (the behaviour without actor reuse)")
    p.add_argument("--stock", action="store_true", help="also run the same trials through Ray's OptunaSearch and MLflowLoggerCallback, side by side")
    p.add_argument("--keep", default=None, help="keep the sweep's folder here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lada-overhead-"))
    if work.exists() and args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary, records, wall = run(args, work)
        label = "fresh worker per trial" if args.no_reuse_actors else "workers reused between trials"
        report(summary, records, wall, label)
        if args.stock:
            stock_work = work / "stock"
            stock_work.mkdir()
            stock = run_stock(args, stock_work)
            side_by_side((summary, records, wall), stock)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
