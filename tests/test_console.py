"""The console of ``lada-sweep`` (progress, per-trial lines, where the libraries' logs go), the MLflow
experiment's kind tag, the parent run's description and the HTML page: units, no Ray started."""

from __future__ import annotations

import io
import logging
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sweeps.console import RAY_AUTH_NOTICE, RAY_AUTH_NOTICE_LOGGER, QuietLogs, header_lines, mlflow_run_url
from sweeps.objective import OBJECTIVE, VAL_METRICS
from sweeps.progress import SweepProgress, progress_text
from sweeps.results import NUM_TASKS, TASKS_DONE

pytestmark = pytest.mark.unit


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trial(tid: str, status: str, done: int, value: float | None, **config: Any) -> SimpleNamespace:
    result = {TASKS_DONE: done, NUM_TASKS: 3, "time_total_s": 75.0}
    if value is not None:
        result[OBJECTIVE] = value
    return SimpleNamespace(trial_id=tid, status=status, last_result=result, config=config)


def _sweep() -> list[SimpleNamespace]:
    return [
        _trial("a", "TERMINATED", 3, 40.0, lr=0.001),
        _trial("b", "TERMINATED", 3, 55.5, lr=0.01),
        _trial("c", "TERMINATED", 1, 20.0, lr=0.1),  # stopped after a task: pruned
        _trial("d", "ERROR", 2, None, lr=0.2),
        _trial("e", "RUNNING", 2, 30.0, lr=0.3),
        _trial("f", "PENDING", 0, None, lr=0.4),
    ]


def test_progress_counts_best_and_eta() -> None:
    p = SweepProgress(total=8, num_tasks=3, objective="average", stream=io.StringIO(), in_place=False)
    counts, best, fraction = p.state(_sweep())
    assert counts == {"completed": 2, "pruned": 1, "failed": 1, "running": 1}
    assert best == (55.5, {"lr": 0.01})
    assert fraction == pytest.approx((4 * 3 + 2) / (8 * 3))
    p.t0 = 0.0
    text = p.refresh(_sweep(), force=True)
    assert text.startswith("trials 4/8 done (2 completed, 1 running, 1 pruned, 1 failed); best average 55.500 (lr=0.01); 58% of task steps, elapsed ")
    assert progress_text(counts, 8, None, "average", elapsed=100.0, fraction=0.25).endswith("25% of task steps, elapsed 1m40s, ETA 5m00s")
    assert progress_text({}, 8, None, "average", elapsed=100.0, fraction=0.0).endswith("ETA ?")


def test_progress_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    p = SweepProgress(total=8, num_tasks=3, objective="average", stream=out, plain_every_s=1e9)
    trials = _sweep()
    p.refresh(trials)  # the first line is shown
    p.refresh(trials)  # unchanged: nothing
    trials[4].last_result[TASKS_DONE] = 3
    p.refresh(trials)  # changed, but too soon for a plain line
    p.on_trial_complete(0, trials, trials[1])
    p.on_trial_error(0, trials, trials[3])
    p.on_experiment_end(trials)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033[K" not in out.getvalue()
    assert lines[0].startswith("trials 4/8 done")
    assert lines[1] == "trial b completed average 55.500 after 3/3 tasks in 1m15s: lr=0.01"
    assert lines[2] == "trial d failed after 2/3 tasks in 1m15s: lr=0.2"
    assert lines[3].startswith("trials 4/8 done") and len(lines) == 4


def test_progress_rewrites_one_line_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = _Tty()
    p = SweepProgress(total=2, num_tasks=3, objective="last", stream=out)
    trials = [_trial("a", "RUNNING", 1, 10.0), _trial("b", "RUNNING", 0, None)]
    p.refresh(trials)
    trials[0].last_result[TASKS_DONE] = 2
    p.refresh(trials)
    assert out.getvalue().count("\r\033[K") == 2 and "\n" not in out.getvalue(), "rewritten in place"
    trials[0].status, trials[0].last_result[TASKS_DONE] = "TERMINATED", 3
    p.on_trial_complete(0, trials, trials[0])
    p.on_experiment_end(trials)
    text = out.getvalue()
    assert "\r\033[Ktrial a completed last 10.000 after 3/3 tasks" in text and text.endswith("\n")
    assert text.count("\n") == 2, "the trial's line and the end of the progress line"
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _Tty()
    SweepProgress(total=2, num_tasks=3, objective="last", stream=narrow).refresh(trials)
    assert len(narrow.getvalue()) == len("\r\033[K") + 39 and narrow.getvalue().endswith("..."), "fits one row"


def test_quiet_logs_route_the_libraries_to_the_file(tmp_path: Path) -> None:
    log = tmp_path / "lada-sweep.log"
    console = io.StringIO()
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    with QuietLogs(log, verbose=0, stream=console):
        logging.getLogger("ray.tune").info("a Tune table")
        logging.getLogger("optuna").warning("a study note")
        logging.getLogger("mlflow.store").info("creating tables")
        logging.getLogger(RAY_AUTH_NOTICE_LOGGER).warning(RAY_AUTH_NOTICE + " for this Ray cluster.")
        logging.getLogger("sweeps.tracking").warning("MLflow at x is unreachable")
    text = log.read_text()
    assert "a Tune table" in text and "a study note" in text and "creating tables" in text
    assert RAY_AUTH_NOTICE not in text and RAY_AUTH_NOTICE not in console.getvalue()
    assert console.getvalue() == "MLflow at x is unreachable\n", "only the sweep's own warning on the console"
    assert (list(ray_logger.handlers), ray_logger.propagate) == before, "restored"


def test_the_log_file_is_made_at_its_first_record_and_a_failing_one_goes_silent(tmp_path: Path) -> None:
    from sweeps.console import log_path

    folder = tmp_path / "results" / "sweep"
    log = log_path(str(folder), "sweep")
    with QuietLogs(log, verbose=0, stream=io.StringIO()):
        assert not (tmp_path / "results").exists(), "nothing written before a record"
        logging.getLogger("optuna").warning("first")  # (an earlier test may have left Optuna's logger at WARNING)
    assert log == folder / "lada-sweep.log" and "first" in log.read_text()
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    err = io.StringIO()
    with QuietLogs(blocked / "lada-sweep.log", verbose=0, stream=err) as q:
        logging.getLogger("mlflow").info("cannot be written")  # no exception, no traceback
        assert q.handler is not None and q.handler.level > logging.CRITICAL
    assert err.getvalue() == ""


def test_ray_still_emits_the_auth_notice_from_that_logger() -> None:
    """Contract with Ray 2.60: the notice QuietLogs drops comes from this logger, with this text."""
    import inspect

    from ray._private.authentication import authentication_token_setup as ats

    assert ats.logger.name == RAY_AUTH_NOTICE_LOGGER
    assert RAY_AUTH_NOTICE in inspect.getsource(ats._warn_token_auth_enabled)


def test_header_and_run_url(tmp_path: Path) -> None:
    assert mlflow_run_url("sqlite:///mlflow.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert mlflow_run_url("http://127.0.0.1:5050/", "3", "abc") == "http://127.0.0.1:5050/#/experiments/3/runs/abc"
    s = SimpleNamespace(name="n", space="lada_smoke", num_samples=4, mode="max", num_tasks=7, scheduler="fifo", folder="/r/n",
                        study_storage="sqlite:////r/n/optuna.db", mlflow_uri="sqlite:///mlflow.db", parent_run_id="abc")
    lines = header_lines(s, "average", tmp_path / "x.log", "URL", "/tmp/ray/session/logs")
    assert len(lines) == 4 and lines[0].startswith("lada-sweep: n: space lada_smoke, 4 trials, objective average (max)")
    assert "URL" in lines[2] and str(tmp_path / "x.log") in lines[3] and "/tmp/ray/session/logs" in lines[3]


def test_experiment_tagged_for_the_runs_table_new_and_existing(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("made-before")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "made-before", uri) == old
    new = get_or_create_experiment(client, "new", uri)
    for exp_id in (old, new):
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def _study() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 50 + 10 * t.suggest_float("lr", 0.0, 1.0) - 3 * t.suggest_int("m", 1, 4), n_trials=8)
    return study


def test_markdown_note_and_html_page() -> None:
    from sweeps.notes import html_page, leaderboard, markdown_note
    from sweeps.visuals import HEATMAP, TITLES, plotly_figures

    rows = [{"trial_id": t, "outcome": o, "objective": v, "tasks_done": 3, "config": {"lr": lr}, **{k: v for k in VAL_METRICS}}
            for t, o, v, lr in (("a", "completed", 40.0, 0.1), ("b", "completed", 55.0, 0.2), ("c", "failed", None, 0.3))]
    head, cells = leaderboard(rows, "max")
    assert [c[1] for c in cells] == ["b", "a", "c"] and head[-1] == "lr"
    assert head[4:7] == list(VAL_METRICS) and cells[0][4] == "55.00", "the validation metrics of the rows"
    summary = {"name": "s", "space": "x", "objective": "average", "mode": "max", "trials": 3, "outcomes": {"completed": 2, "failed": 1},
               "best": rows[1], "rows": rows, "wall_s": 10.0}
    note = markdown_note(summary, "lada:\n  memory_size: 8\n", {"lr": 0.7}, ["lada-train --config best.yaml"])
    assert "| 1 | b | completed | 55.00 |" in note and "memory_size: 8" in note and "| lr | 0.700 |" in note
    assert "lada-train --config best.yaml" in note.split("### Reproduce")[1]
    short = markdown_note(summary, "x: 1\n" * 3000, {"lr": 0.7}, ["lada-train --config best.yaml"])
    assert len(short) <= 8000 and "artifact `best_config.yaml`" in short and "| 1 | b | completed |" in short

    figs = plotly_figures(_study(), ([[80.0, 0.0], [70.0, 60.0]], ["fashion", "digits"]))
    page = html_page("Sweep s", "intro", (head, cells), "a: 1\n", {"lr": 0.7}, ["cmd <1>"], figs, TITLES)

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, dict]] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.seen.append((tag, dict(attrs)))

    parsed = Tags()
    parsed.feed(page)
    divs = {a.get("id") for t, a in parsed.seen if t == "div"}
    assert {f"plot-{n}" for n in ("optimization_history", "param_importances", "parallel_coordinate", HEATMAP)} <= divs
    assert sum(1 for t, _ in parsed.seen if t == "table") == 2
    assert not [a for t, a in parsed.seen if t == "script" and a.get("src")] and page.count("plotly.js v") >= 1
    assert "cmd &lt;1&gt;" in page


def test_png_figures_for_the_parent_run() -> None:
    from sweeps.visuals import PLOTS, png_figures

    figs = png_figures(_study(), ([[80.0, 0.0], [70.0, 60.0]], ["fashion", "digits"]))
    assert set(figs) == set(PLOTS)
    assert all(hasattr(f, "savefig") for f in figs.values())
