"""``lada-sweep-evaluate`` end to end (issue 11, section 3): after a sweep tuned on validation data, the
top config and the paper defaults are trained with two seeds as Ray Tune trials, logged as child runs of
the sweep's parent tagged ``lada.phase=final``, scored on test, and reported with the paired difference;
with a test image deleted the command stops with one line naming it (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweeps_helpers import SweepDirs, child_runs, kill_group, run_sweep, settings, summary, sweep_args, sweep_env
from xtail_fixture import make_xtail_tree, remove_test_images

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_final_evaluation_then_a_missing_test_image(sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    dirs = sweep_dirs
    root = make_xtail_tree(tmp_path / "xtail", 2, 10, 1, val_per_class=2)
    res = run_sweep(dirs, sweep_args(dirs, "fin", "--space", "lada_smoke", "--tiny-model", "--benchmark", "xtail", "--data-root", str(root),
                                     "--num-samples", "2", "--max-concurrent", "1", "--set", "data.shots=null", "--set", "optim.epochs=1",
                                     "--set", "optim.batch_size=8", "--time-budget-s", "400", "--final-eval", "--final-top", "1", "--final-seeds", "2"))
    assert res.returncode == 0, res.stderr[-5000:]  # lada-sweep --final-eval: the sweep, then lada-sweep-evaluate
    assert summary(dirs, "fin")["completed"] == 2 and "Final evaluation of sweep fin" in res.stdout
    cmd = [sys.executable, "-m", "sweeps.evaluate", "--name", "fin", "--storage", str(dirs.storage), "--top", "1", "--seeds", "2", "--local-cpus", "2"]
    report = json.loads((dirs.folder("fin") / "final_report.json").read_text())
    rows = report["rows"]
    assert [r["config"] for r in rows][0] == "paper defaults" and len(rows) == 2
    assert rows[1]["seeds"] == 2 and rows[1]["verdict"] in ("beats the defaults", "indistinguishable", "worse")
    assert rows[1]["val_objective"] is not None and all(0 <= r["test_average"][0] <= 100 for r in rows)
    assert rows[1]["params"] and rows[0]["val_objective"] is not None  # the defaults ran as the sweep's first trial
    md = (dirs.folder("fin") / "final_report.md").read_text()
    assert "| paper defaults" in md and rows[1]["verdict"] in md
    st = settings(dirs, "fin")
    final = [r for r in child_runs(dirs.mlflow_uri, st["parent_run_id"]) if r.data.tags.get("lada.phase") == "final"]
    assert len(final) == 4 and all(r.info.status == "FINISHED" for r in final)
    assert all("test/average" in r.data.metrics and not any(k.startswith("val/") for k in r.data.metrics) for r in final)
    rep = subprocess.run([sys.executable, "-m", "sweeps.report", "--storage", str(dirs.storage), "--name", "fin"],
                         capture_output=True, text=True, cwd=dirs.root, timeout=300)
    assert rep.returncode == 0 and "Final evaluation of sweep fin" in rep.stdout, rep.stderr[-3000:]

    # Run again (as after a kill): the final Tune run is restored, nothing is trained again.
    final_dir = dirs.storage / "fin-final"
    before = {p: p.read_text() for p in final_dir.glob("*/result.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=dirs.root, env=sweep_env(dirs), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(before) == 4 and {p: p.read_text() for p in final_dir.glob("*/result.json")} == before, "no final trial ran again"
    assert len([r for r in child_runs(dirs.mlflow_uri, st["parent_run_id"]) if r.data.tags.get("lada.phase") == "final"]) == 4
    assert json.loads((dirs.folder("fin") / "final_report.json").read_text())["rows"] == rows

    # Tune on one tree, evaluate on another of the same shape (Cha & Cho's two-phase protocol). One
    # final trial at a time; the command is killed once the first has finished, then run again.
    other = make_xtail_tree(tmp_path / "xtail-other", 2, 10, 1, val_per_class=2, seed=7)
    on_args = [*cmd[:-1], "1", "--benchmark", "xtail", "--data-root", str(other)]
    proc = subprocess.Popen(on_args, cwd=dirs.root, env=sweep_env(dirs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def finished() -> dict[Path, str]:
        out = {}
        for f in dirs.storage.glob("fin-final.xtail-*/*/result.json"):
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            if rows and rows[-1].get("tasks_done") == rows[-1].get("num_tasks") == 10:
                out[f] = f.read_text()
        return out

    try:
        deadline = time.monotonic() + 400
        while not finished() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        done_before = finished()
        assert proc.poll() is None and len(done_before) == 1, "killed with one final trial finished and three to go"
    finally:
        kill_group(proc)
    on_other = subprocess.run(on_args[:-5] + ["2", *on_args[-4:]], capture_output=True, text=True, cwd=dirs.root,
                              env=sweep_env(dirs), timeout=600)
    assert on_other.returncode == 0, on_other.stderr[-3000:]
    after = finished()

    def trained(text: str) -> list[str]:
        """Ray's rows less the replayed ones (a step Tune's saved state lacked, reported again from its
        stored checkpoint without training: Ray's result.json is at-least-once)."""
        return [line for line in text.splitlines() if line.strip() and not json.loads(line).get("replayed")]

    assert len(after) == 4 and all(trained(after[f]) == trained(text) for f, text in done_before.items()), \
        "the finished trial was not trained again"
    (other_json,) = dirs.folder("fin").glob("final_report.xtail-*.json")
    other_report = json.loads(other_json.read_text())
    assert other_report["tuned_on"] == "xtail" and other_report["evaluated_data_root"] == str(other.resolve())
    assert [r["val_objective"] for r in other_report["rows"]] == [r["val_objective"] for r in rows], "the tuning scores beside"
    assert other_report["rows"][1]["verdict"] in ("beats the defaults", "indistinguishable", "worse")
    assert f"evaluated on xtail ({other.resolve()}) (test)" in other_json.with_suffix(".md").read_text()
    runs = [r for r in child_runs(dirs.mlflow_uri, st["parent_run_id"]) if r.data.tags.get("lada.phase") == "final"]
    assert len([r for r in runs if r.info.status == "FINISHED"]) == 8 and all(r.data.tags.get("lada.eval_benchmark") == "xtail" for r in runs)

    remove_test_images(root)
    ev = subprocess.run(cmd, capture_output=True, text=True, cwd=dirs.root, env=sweep_env(dirs), timeout=300)
    lines = [line for line in ev.stderr.splitlines() if line.startswith("lada-sweep-evaluate: error:")]
    assert ev.returncode == 2 and len(lines) == 1, ev.stderr[-3000:]
    assert "missing, first: " in lines[0] and str(root) in lines[0]
