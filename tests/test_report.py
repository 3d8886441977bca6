"""`megacpt report`: the PNGs exist and are real images, index.html shows them, and report.json holds
exactly the series behind the plots (x = tokens seen, y = the logged values), for every run and domain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megacpt.cli import main

PLOTS = ("loss.png", "lr.png", "throughput.png", "valid_ppl.png", "valid_ppl_vs_base.png")
DOMAINS = ("new", "original")


def fake_run(path: Path, *, steps=120, gb=8, seq=256, lr=3e-4, replay=0.05, eval_interval=20, seed=0,
             resumed_at=None) -> list[dict]:
    """A run dir like megacpt train writes: config.resolved.json and metrics.jsonl with training lines
    every step and validation lines (step 0 = base) every `eval_interval`. With `resumed_at`, the
    steps after it are logged twice (as after a crash and resume), the second time with other values."""
    import random

    rnd = random.Random(seed)
    path.mkdir(parents=True)
    cfg = {"config": {"run_dir": str(path), "data": {"seq_len": seq},
                      "train": {"global_batch_size": gb, "steps": steps}},
           "deepspeed": {}, "world_size": 2, "model": {}}
    (path / "config.resolved.json").write_text(json.dumps(cfg))
    base = {"new": 40.0, "original": 12.0}
    recs = []

    def valid(step, bump=0.0):
        rec = {"step": step}
        t = step / steps
        ppl = {"new": base["new"] * (1 - 0.45 * t ** 0.5) + bump,
               "original": base["original"] * (1 + (0.3 - replay * 4) * t) + bump}
        for d in DOMAINS:
            rec[f"valid/{d}/loss"] = math.log(ppl[d])
            rec[f"valid/{d}/ppl"] = ppl[d]
            if step > 0:
                rec[f"valid/{d}/ppl_vs_base"] = ppl[d] / base[d]
        return rec

    def train(step, bump=0.0):
        warm = min(1.0, step / 10)
        return {"step": step, "phase": "main", "loss": 3.7 - 0.6 * (step / steps) ** 0.5 + rnd.gauss(0, 0.05) + bump,
                "lr": lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / steps)), "grad_norm": 1 + rnd.random(),
                "tokens_per_s": 2 * (9000 + rnd.gauss(0, 300)), "tokens_per_s_per_device": 9000 + rnd.gauss(0, 300),
                "tflops_per_device": 50.0, "mfu": 0.05, "consumed_samples": step * gb,
                "tokens/new": step * gb * seq - int(step * gb * replay) * seq,
                "tokens/replay": int(step * gb * replay) * seq}

    recs.append(valid(0))
    for step in range(1, steps + 1):
        recs.append(train(step))
        if step % eval_interval == 0:
            recs.append(valid(step))
    if resumed_at is not None:  # the crash lost steps after `resumed_at`; they are logged again
        for step in range(resumed_at + 1, steps + 1):
            recs.append(train(step, bump=0.5))
            if step % eval_interval == 0:
                recs.append(valid(step, bump=1.0))
    with open(path / "metrics.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return recs


def expected(recs, key, gb, seq, x="tokens"):
    """Last value logged per step, in step order: what the report must plot."""
    by_step = {}
    for r in recs:
        if key in r:
            by_step[r["step"]] = r[key]
    steps = sorted(by_step)
    xs = [s * gb * seq for s in steps] if x == "tokens" else steps
    return xs, [by_step[s] for s in steps]


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[:2]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    a = fake_run(tmp / "replay-0", replay=0.0, seed=1)
    b = fake_run(tmp / "replay-25", replay=0.25, seed=2, gb=16, seq=128, steps=60, eval_interval=15, resumed_at=40)
    out = tmp / "out"
    assert main(["report", str(tmp / "replay-0"), str(tmp / "replay-25"), "--output", str(out)]) == 0
    return tmp, out, {"replay-0": (a, 8, 256), "replay-25": (b, 16, 128)}


def test_pngs_are_real_images(two_runs):
    _, out, _ = two_runs
    for name in PLOTS:
        p = out / name
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 10_000, f"{name} is only {len(data)} bytes"
        h, w = png_size(p)
        assert w >= 600 and h >= 300, (name, w, h)
    # no temporary files left behind
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_index_shows_plots_and_final_values(two_runs):
    _, out, runs = two_runs
    page = (out / "index.html").read_text()
    for name in PLOTS:
        assert f'src="{name}"' in page
    for run in runs:
        assert run in page
    data = json.loads((out / "report.json").read_text())
    rows = {r["run"]: r for r in data["runs"]}
    for run, (recs, gb, seq) in runs.items():
        row = rows[run]
        last = max(r["step"] for r in recs if "loss" in r)
        loss_by_step = {r["step"]: r["loss"] for r in recs if "loss" in r}  # last write per step wins
        assert row["step"] == last and row["tokens"] == last * gb * seq
        assert row["loss"] == pytest.approx(loss_by_step[last])
        assert f"{row['loss']:.4g}" in page
        for d in DOMAINS:
            _, ys = expected(recs, f"valid/{d}/ppl", gb, seq)
            v = row["valid"][d]
            assert v["base_ppl"] == pytest.approx(ys[0]) and v["ppl"] == pytest.approx(ys[-1])
            assert v["ppl_vs_base"] == pytest.approx(ys[-1] / ys[0])
            assert f"×{v['ppl_vs_base']:.3f}" in page
    # the run with more replay forgets less of the original domain
    assert rows["replay-25"]["valid"]["original"]["ppl_vs_base"] < rows["replay-0"]["valid"]["original"]["ppl_vs_base"]


def test_report_json_holds_the_plotted_series(two_runs):
    _, out, runs = two_runs
    plots = json.loads((out / "report.json").read_text())["plots"]
    assert set(plots) == {"loss", "lr", "throughput", "valid_ppl", "valid_ppl_vs_base"}
    for run, (recs, gb, seq) in runs.items():
        for plot, key, x in (("loss", "loss", "tokens"), ("lr", "lr", "tokens"),
                             ("throughput", "tokens_per_s_per_device", "step")):
            xs, ys = expected(recs, key, gb, seq, x)
            s = plots[plot]["series"][run]
            assert s["x"] == xs, (plot, run)
            assert s["y"] == pytest.approx(ys), (plot, run)
        for d in DOMAINS:
            xs, ys = expected(recs, f"valid/{d}/ppl", gb, seq)
            s = plots["valid_ppl"]["panels"][d][run]
            assert s["x"] == xs and xs[0] == 0  # the base model at 0 tokens
            assert s["y"] == pytest.approx(ys)
            rx, ry = expected(recs, f"valid/{d}/ppl_vs_base", gb, seq)
            rel = plots["valid_ppl_vs_base"]["panels"][d][run]
            assert rel["x"] == [0] + rx and rel["y"] == pytest.approx([1.0] + ry)
    assert plots["loss"]["yscale"] == "log" and plots["valid_ppl"]["yscale"] == "log"
    assert plots["loss"]["xlabel"] == "tokens seen"


def test_tokens_from_sources_without_config_and_bad_lines(tmp_path):
    recs = fake_run(tmp_path / "run", steps=30, gb=4, seq=64)
    (tmp_path / "run" / "config.resolved.json").unlink()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 2.')  # the last line of a run killed mid-write
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    plots = json.loads((tmp_path / "out" / "report.json").read_text())["plots"]
    xs, ys = expected(recs, "loss", 4, 64)
    assert plots["loss"]["series"]["run"] == {"x": xs, "y": pytest.approx(ys)}


def test_same_dir_names_are_told_apart(tmp_path):
    fake_run(tmp_path / "a" / "run", steps=12, eval_interval=6)
    fake_run(tmp_path / "b" / "run", steps=12, eval_interval=6, seed=3)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--output", str(out)]) == 0
    series = json.loads((out / "report.json").read_text())["plots"]["loss"]["series"]
    assert set(series) == {"a/run", "b/run"}


@pytest.mark.parametrize("case", ["missing", "no_metrics", "empty", "garbage"])
def test_bad_input_is_a_user_error(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "garbage":
        (run / "metrics.jsonl").write_text("not json\n{\"no_step\": 1}\n")
    assert main(["report", str(run), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(run) in err[0]
    assert not (tmp_path / "out" / "index.html").exists()


def test_task_metrics_get_a_plot_per_task_with_the_base_marked(tmp_path):
    """eval.tasks records (task/<name>/<metric>, _vs_base): one PNG per task, the series and the
    base value in report.json, base → final in the table."""
    recs = fake_run(tmp_path / "run", steps=40, eval_interval=20)
    task = [{"step": s, "task/probe_de/acc": a, "task/probe_de/acc_norm": a - 0.05, "task/probe_en/acc": e}
            for s, a, e in ((0, 0.40, 0.70), (20, 0.48, 0.66), (40, 0.55, 0.64))]
    for r in task[1:]:
        r.update({f"{k}_vs_base": v - task[0][k] for k, v in list(r.items()) if k.startswith("task/")})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in task)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "run"), "--output", str(out)]) == 0
    for name in ("task_probe_de.png", "task_probe_en.png"):
        h, w = png_size(out / name)
        assert h > 200 and w > 200
    data = json.loads((out / "report.json").read_text())
    spec = data["plots"]["task:probe_de"]
    assert set(spec["panels"]) == {"acc", "acc_norm"}  # _vs_base is not plotted as a metric
    assert spec["panels"]["acc"]["run"] == {"x": [0, 20 * 8 * 256, 40 * 8 * 256], "y": [0.40, 0.48, 0.55]}
    assert spec["base"]["acc"] == {"run": 0.40}
    row = data["runs"][0]["tasks"]
    assert row["probe_en/acc"]["base"] == 0.70 and row["probe_en/acc"]["final"] == 0.64
    assert row["probe_en/acc"]["vs_base"] == pytest.approx(-0.06)
    page = (out / "index.html").read_text()
    assert "probe_de/acc (base → final)" in page and 'src="task_probe_de.png"' in page
    assert len(recs) > 0


def test_by_position_sets_get_a_plot_of_base_and_last_bucket_losses(tmp_path):
    """valid/NAME/pos_START_END/loss (data.valid[].by_position): one PNG per set with the bucket
    losses at step 0 and at the last evaluation; the buckets are not domains of their own."""
    fake_run(tmp_path / "run", steps=40, eval_interval=20)
    losses = {0: [3.0, 2.8, 2.9], 20: [2.9, 2.6, 2.5], 40: [2.8, 2.5, 2.3]}
    recs = []
    for step, ys in losses.items():
        rec = {"step": step, "valid/long/loss": sum(ys) / 3, "valid/long/ppl": math.exp(sum(ys) / 3)}
        for (s, e), y in zip(((0, 1024), (1024, 2048), (2048, 2500)), ys):
            rec.update({f"valid/long/pos_{s}_{e}/loss": y, f"valid/long/pos_{s}_{e}/ppl": math.exp(y)})
        recs.append(rec)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "run"), "--output", str(out)]) == 0
    h, w = png_size(out / "by_position_long.png")
    assert h > 200 and w > 200
    data = json.loads((out / "report.json").read_text())
    assert set(data["plots"]["valid_ppl"]["panels"]) == {"new", "original", "long"}
    curves = data["plots"]["by_position:long"]["curves"]["run"]
    assert curves["base"]["step"] == 0 and curves["last"]["step"] == 40
    assert curves["base"]["y"] == losses[0] and curves["last"]["y"] == losses[40]
    assert curves["last"]["start"] == [0, 1024, 2048] and curves["last"]["end"] == [1024, 2048, 2500]
    assert curves["last"]["x"] == [512, 1536, 2274]
    assert set(data["runs"][0]["valid"]) == {"new", "original", "long"}
    assert 'src="by_position_long.png"' in (out / "index.html").read_text()
