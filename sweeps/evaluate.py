"""``lada-sweep-evaluate --name NAME``: the final evaluation phase of a sweep (issue 11, section 3).

A sweep selects on validation data (Cha & Cho, "Hyperparameters in Continual Learning: A Reality
Check", TMLR 2025); its best trial's score is the maximum over many noisy trials, so it is not an
estimate of anything. This command takes the top ``--top`` configs by validation objective and the
paper defaults, trains each with ``--seeds`` seeds on the training data (``eval.split=test``),
scores them on test, and writes ``final_report.json`` / ``final_report.md`` in the sweep's folder (and
on its MLflow parent run): per config the validation objective, test Transfer / Average / Last as
mean +- std over seeds, the difference to the defaults with a 95% interval paired over seeds, and a
verdict (:mod:`sweeps.final_stats`).

The final trials are Ray Tune trials (the sweep's trainable, its checkpoints and ``--max-failures``),
logged as child runs of the sweep's parent run tagged ``lada.phase=final``. Every test image is
checked first: a missing one stops the command with one line naming it (exit code 2). Run again
(after a kill, say), the command restores its Tune run: finished final trials are not trained again.

``--benchmark OTHER [--data-root DIR]`` evaluates the chosen configs on another task sequence of the
same shape (Cha & Cho's two-phase protocol: tune on one scenario, evaluate on another); the report,
``final_report.<other>.md/.json``, puts the tuning benchmark's validation objective beside the other
benchmark's test scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lada_core import metrics as M
from sweeps.objective import PEEK_SPLIT, metric_key
from sweeps.settings import FINAL_MD, Settings, UsageError

FINAL_JSON = "final_report.json"
PHASE_TAG = "lada.phase"
EVAL_TAG = "lada.eval_benchmark"
DEFAULTS = "paper defaults"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lada-sweep-evaluate", description="Train the sweep's top configs and the paper defaults with "
                                "several seeds and score them on test (the final evaluation).")
    p.add_argument("--name", required=True, help="the sweep's name")
    p.add_argument("--storage", default="sweep_results", help="the sweep's --storage")
    p.add_argument("--top", type=int, default=3, help="configs to evaluate, by validation objective (default 3)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config (train.seed 0..S-1; default 3)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: a local Ray)")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed final trial, from its last task")
    p.add_argument("--benchmark", default=None, help="evaluate on another task sequence of the same shape (a benchmark name or "
                   "YAML file; default: the one the sweep tuned on)")
    p.add_argument("--data-root", default=None, help="the data of --benchmark (default: the sweep's)")
    return p


def target_of(settings: Settings, benchmark: str | None, data_root: str | None) -> tuple[dict[str, Any], str]:
    """The data overrides of the final trials and the suffix of their report and Tune run: none for
    the benchmark the sweep tuned on; ``--benchmark``/``--data-root`` and a short name otherwise."""
    import hashlib
    from pathlib import Path

    if benchmark is None and data_root is None:
        return {}, ""
    over: dict[str, Any] = {}
    if benchmark is not None:
        over["data.benchmark"] = benchmark
    if data_root is not None:
        over["data.data_root"] = str(Path(data_root).resolve())
    name = Path(benchmark).stem if benchmark else "data"
    root = over.get("data.data_root")
    return over, f".{name}-{hashlib.sha1(root.encode()).hexdigest()[:6]}" if root else f".{name}"


def candidates(settings: Settings, top: int, spec: Any) -> list[tuple[str, dict[str, Any], float | None]]:
    """``(label, sampled params, validation objective)``: the paper defaults first (no sampled
    parameter: the config's defaults, the paper's; their validation objective is that of the trial
    that ran them, if one did), then the ``top`` best distinct completed trials other than the defaults."""
    from optuna.trial import TrialState

    from sweeps.optuna_storage import load_study

    study = load_study(settings.study_storage, settings.name)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.value is not None]
    done.sort(key=lambda t: -float(t.value or 0.0) if settings.mode == "max" else float(t.value or 0.0))
    defaults = spec.config({})
    default_value: float | None = None
    picked: list[tuple[str, dict[str, Any], float | None]] = []
    seen: list[dict[str, Any]] = []
    for t in done:
        if spec.config(dict(t.params)) == defaults:
            default_value = float(t.value or 0.0) if default_value is None else default_value
        elif dict(t.params) not in seen and len(seen) < top:
            seen.append(dict(t.params))
            picked.append((f"trial {t.number}", dict(t.params), float(t.value or 0.0)))
    return [(DEFAULTS, {}, default_value), *picked]


def final_spec(settings: Settings, data: dict[str, Any] | None = None) -> Any:
    """The sweep's trial spec with ``eval.split=test`` (and no peeking), on the ``data`` overrides
    (:func:`target_of`): the final trials' config."""
    from lada_core.config import from_dict
    from sweeps.objective import parse_metric
    from sweeps.trainable import TrialSpec

    base = from_dict({"eval.split": "test", "eval.peek_test": False, **(data or {})}, settings.base_config())
    return TrialSpec(base_config=base.to_dict(), overrides=tuple(settings.set), objective=parse_metric(settings.metric),
                     metric_split=PEEK_SPLIT)


def check_test_images(cfg: Any) -> None:
    """Open every task's test split (a lazy source checks that each listed file exists): a missing
    test image raises :class:`DataError` naming it."""
    from lada_core.benchmarks import benchmark_for

    for task in benchmark_for(cfg.data).tasks:
        len(task.test)


def final_trainable(config: dict[str, Any], spec: Any, points: list[dict[str, Any]]) -> None:
    """One final trial: candidate ``config["candidate"]`` with ``train.seed = config["seed"]``."""
    from sweeps.trainable import lada_trainable

    lada_trainable({**points[int(config["candidate"])], "train.seed": int(config["seed"])}, spec)


def final_run_target(settings: Settings, spec: Any, suffix: str = "") -> tuple[str, Any]:
    """The final Tune run's folder (``<name>-final<suffix>`` in the sweep's storage) and the spec its
    trials run with: a final trial restored from an older checkpoint than it stored (the command
    killed between two of Tune's snapshots) continues from its newest stored task, as a sweep's trial
    does (:func:`sweeps.recovery.resume_point`), so its results folder is the run's own."""
    from sweeps.settings import is_uri, join_path

    path = join_path(settings.storage, f"{settings.name}-final{suffix}")
    return path, replace(spec, results_dir=None if is_uri(path) else path)


def run_final(settings: Settings, spec: Any, points: list[dict[str, Any]], seeds: int, max_failures: int, suffix: str = "") -> Any:
    """The final trials as one Tune run (``<name>-final<suffix>`` in the sweep's storage), each a child
    run of the sweep's MLflow parent tagged ``lada.phase=final``; restored when it exists (its
    finished trials are kept, the others resume from their last task)."""
    from ray import tune

    from sweeps.settings import is_uri
    from sweeps.tracking import MlflowTracker, get_or_create_experiment, open_client

    path, spec = final_run_target(settings, spec, suffix)
    client = open_client(settings.mlflow_uri)
    exp = get_or_create_experiment(client, settings.experiment, settings.mlflow_uri)
    tracker = MlflowTracker(settings.mlflow_uri, exp, settings.parent_run_id or "", sweep_name=settings.name, spec=spec,
                            extra_tags={PHASE_TAG: "final", "lada.space": settings.space, EVAL_TAG: spec.config({}).data.benchmark})
    trainable = tune.with_resources(tune.with_parameters(final_trainable, spec=spec, points=points),
                                    {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial or 0})
    if not is_uri(path) and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True).fit()
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(list(range(len(points)))), "seed": tune.grid_search(list(range(seeds)))},
        run_config=tune.RunConfig(name=f"{settings.name}-final{suffix}", storage_path=settings.storage, callbacks=[tracker],
                                  failure_config=tune.FailureConfig(max_failures=max_failures), verbose=0),
    )
    return tuner.fit()


def final_table(cands: list[tuple[str, dict[str, Any], float | None]], scores: dict[tuple[int, int], dict[str, float]], seeds: int,
                objective: Any, higher_is_better: bool) -> list[dict[str, Any]]:
    """One row per candidate: test metrics mean +- std over seeds, the paired difference of the
    objective to the defaults (candidate 0) with its 95% interval, and the verdict."""
    from sweeps.final_stats import mean_std, paired_interval, verdict

    def obj(i: int, s: int) -> float:
        return objective.value({m: scores[i, s][metric_key(m, PEEK_SPLIT)] for m in M.METRICS if (i, s) in scores})

    rows = []
    for i, (label, params, val) in enumerate(cands):
        row: dict[str, Any] = {"config": label, "params": params, "val_objective": val}
        for m in M.METRICS:
            vals = [scores[i, s][metric_key(m, PEEK_SPLIT)] for s in range(seeds) if (i, s) in scores]
            row[f"test_{m}"] = mean_std(vals)
        both = [s for s in range(seeds) if (i, s) in scores and (0, s) in scores]
        if i > 0:
            d = paired_interval([obj(i, s) for s in both], [obj(0, s) for s in both])
            row.update(diff=d.mean, diff_low=d.low, diff_high=d.high, seeds=d.n, verdict=verdict(d, higher_is_better))
        rows.append(row)
    return rows


def format_md(settings: Settings, rows: list[dict[str, Any]], tuned_on: str = "", scored_on: str = "") -> str:
    """The final table as Markdown (``tuned_on``/``scored_on``: the two benchmarks when they differ)."""
    def pm(v: tuple[float, float]) -> str:
        return "-" if math.isnan(v[0]) else f"{v[0]:.2f} +- {v[1]:.2f}"

    where = f" Tuned on {tuned_on} (validation), evaluated on {scored_on} (test)." if scored_on else ""
    val_head = f"val objective ({tuned_on})" if scored_on else "val objective"
    test = f"test ({scored_on})" if scored_on else "test"
    lines = [f"# Final evaluation of sweep {settings.name}" + (f" on {scored_on}" if scored_on else ""), "",
             f"Selected on validation data ({settings.metric}); trained with several seeds and scored on test.{where} "
             "Difference: the objective on test minus the paper defaults', paired over seeds, with a 95% interval.", "",
             f"| config | {val_head} | {test} transfer | {test} average | {test} last | difference to defaults | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if "diff" not in r else f"{r['diff']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}]"
        val = "-" if r["val_objective"] is None else f"{r['val_objective']:.2f}"
        lines.append(f"| {r['config']} {r['params'] or ''} | {val} | {pm(r['test_transfer'])} | {pm(r['test_average'])} | "
                     f"{pm(r['test_last'])} | {diff} | {r.get('verdict', '-')} |")
    return "\n".join(lines) + "\n"


def _scores(grid: Any) -> dict[tuple[int, int], dict[str, float]]:
    """The last result of every final trial that finished its last task, by (candidate, seed)."""
    from sweeps.results import NUM_TASKS, TASKS_DONE

    out = {}
    for r in grid:
        m = r.metrics or {}
        if r.error is None and m.get(TASKS_DONE) and m.get(TASKS_DONE) == m.get(NUM_TASKS):
            out[int(r.config["candidate"]), int(r.config["seed"])] = {k: float(v) for k, v in m.items() if str(k).startswith("test/")}
    return out


def evaluate(settings: Settings, top: int, seeds: int, max_failures: int, benchmark: str | None = None,
             data_root: str | None = None) -> int:
    """The final evaluation of ``settings``'s sweep (on ``benchmark``/``data_root`` when given); returns the exit code."""
    from dataclasses import replace

    from lada_core.features import ensure_cache
    from sweeps.objective import parse_metric
    from sweeps.settings import join_path, write_text

    data, suffix = target_of(settings, benchmark, data_root)
    spec = final_spec(settings, data)
    cfg = spec.config({})
    tuned = final_spec(settings)
    cands = candidates(settings, top, tuned)
    info = ensure_cache(cfg, progress=sys.stderr.isatty())
    spec = replace(spec, cache_path=str(info.path))
    grid = run_final(settings, spec, [p for _, p, _ in cands], seeds, max_failures, suffix)
    scores = _scores(grid)
    rows = final_table(cands, scores, seeds, parse_metric(settings.metric), settings.mode == "max")
    scored_on = f"{cfg.data.benchmark} ({cfg.data.data_root})" if suffix else ""
    tuned_on = str(tuned.config({}).data.benchmark)
    md = format_md(settings, rows, tuned_on, scored_on)
    report = {"name": settings.name, "seeds": seeds, "tuned_on": tuned_on, "evaluated_on": cfg.data.benchmark,
              "evaluated_data_root": cfg.data.data_root, "rows": rows}
    json_name, md_name = FINAL_JSON.replace(".json", f"{suffix}.json"), FINAL_MD.replace(".md", f"{suffix}.md")
    write_text(join_path(settings.folder, json_name), json.dumps(report, indent=2, default=str))
    write_text(join_path(settings.folder, md_name), md)
    if settings.parent_run_id:
        from sweeps.tracking import open_client

        client = open_client(settings.mlflow_uri)
        client.log_text(settings.parent_run_id, md, md_name)
        client.log_dict(settings.parent_run_id, report, json_name)
    print(md)
    return 0 if scores else 1


def main(argv: Sequence[str] | None = None) -> int:
    from lada_core.benchmarks import DataError
    from sweeps.settings import load_settings, storage_root

    args = build_parser().parse_args(argv)
    try:
        if args.top < 0 or args.seeds < 1:
            raise UsageError("--top must be >= 0 and --seeds >= 1")
        settings = load_settings(storage_root(args.storage), args.name)
        if settings is None:
            raise UsageError(f"no sweep {args.name!r} in {storage_root(args.storage)}")
        check_test_images(final_spec(settings, target_of(settings, args.benchmark, args.data_root)[0]).config({}))  # before anything starts
        import ray

        ray.init(address=args.address, num_cpus=None if args.address else args.local_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            return evaluate(settings, args.top, args.seeds, args.max_failures, args.benchmark, args.data_root)
        finally:
            ray.shutdown()
    except (UsageError, DataError) as exc:
        print(f"lada-sweep-evaluate: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
