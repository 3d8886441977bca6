"""`megacpt report RUN_DIR [RUN_DIR ...] --output DIR`: plots and one HTML page for training runs.

Reads each run's metrics.jsonl (and config.resolved.json for the tokens per step) and writes:

- loss.png        training loss vs tokens seen (log y; a smoothed line on top when noisy)
- lr.png          learning rate vs tokens seen
- throughput.png  tokens/s per device vs step
- valid_ppl.png   validation perplexity vs tokens seen, one panel per domain (log y); the base
                  model (step 0) sits at 0 tokens
- valid_ppl_vs_base.png  the same relative to the base model (1 = unchanged): learning on the new
                  domain, forgetting on the original one
- task_<name>.png one per lm-eval task logged in the loop (eval.tasks): each metric vs tokens
                  seen, the base model's value (step 0) as a dashed line in the run's colour
- by_position_<name>.png  one per validation set with data.valid[].by_position: loss per bucket of
                  positions at the base model (step 0, dashed) and at the run's last evaluation
                  (solid): whether later positions gain from the longer context
- report.json     the exact series plotted ({plot: {series|panels: {run: {x, y}}}}) and the
                  final values per run
- index.html      the plots and a table of final values per run

Several runs are overlaid, one colour per run across all plots, labelled by run dir name.
Tokens seen at step s = s × train.global_batch_size × data.seq_len, phase by phase where phases
change seq_len or the global batch. A resumed run logs some
steps twice (those after its last checkpoint); the line written last wins. Files are written
one by one through a temporary name and os.replace, index.html last, so a reader never sees a
half-written file or an index pointing at missing plots.
"""

from __future__ import annotations

import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megacpt import atomic
from megacpt.config import batch_shapes, config_from_dict
from megacpt.errors import ConfigError, UserError
from megacpt.positions import parse_bucket

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.resolved.json"
AUTO_LOG_SPAN = 4.0  # yscale "auto" turns logarithmic when a panel's values span this factor


@dataclass
class Run:
    name: str
    path: Path
    tokens_per_step: int  # of the main phase
    train: dict = field(default_factory=dict)  # step -> merged training record
    valid: dict = field(default_factory=dict)  # step -> merged validation record
    tasks: dict = field(default_factory=dict)  # step -> {task/<name>/<metric>: value} (no _vs_base)
    skipped_lines: int = 0
    phase_tokens: list = field(default_factory=list)  # [(steps, tokens per step)] per phase, when they differ

    def domains(self) -> list[str]:
        names = []
        for rec in self.valid.values():
            for k in rec:
                parts = k.split("/")
                if len(parts) == 3 and parts[0] == "valid" and parts[2] == "ppl" and parts[1] not in names:
                    names.append(parts[1])  # not valid/NAME/pos_START_END/ppl, a bucket's
        return names

    def position_curve(self, step: int, name: str) -> dict:
        """{x: bucket midpoints, y: loss, start, end, step} of a by-position set at one evaluation."""
        found = []
        for k, v in self.valid.get(step, {}).items():
            parts = k.split("/")
            span = parse_bucket(parts[2]) if len(parts) == 4 and parts[1] == name and parts[3] == "loss" else None
            if span is not None:
                found.append((*span, _num(v)))
        found.sort()
        return {"x": [(s + e) / 2 for s, e, _ in found], "y": [y for *_, y in found],
                "start": [s for s, _, _ in found], "end": [e for _, e, _ in found], "step": step}

    def position_sets(self) -> list[str]:
        names = []
        for rec in self.valid.values():
            for k in rec:
                parts = k.split("/")
                if len(parts) == 4 and parse_bucket(parts[2]) and parts[1] not in names:
                    names.append(parts[1])
        return names

    def tokens(self, step: int) -> int:
        step, total = int(step), 0
        for n, per_step in self.phase_tokens[:-1]:
            total += min(step, n) * per_step
            step = max(0, step - n)
        return total + step * (self.phase_tokens[-1][1] if self.phase_tokens else self.tokens_per_step)

    def task_metrics(self) -> dict[str, list[str]]:
        """{task name: [metric, ...]} in the order first logged."""
        out: dict[str, list[str]] = {}
        for rec in self.tasks.values():
            for k in rec:
                _, name, metric = k.split("/", 2)
                if metric not in out.setdefault(name, []):
                    out[name].append(metric)
        return out


def _num(v):
    """A finite float or None (NaN/inf/missing/non-numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def load_run(run_dir) -> Run:
    p = Path(run_dir)
    if not p.is_dir():
        raise UserError(f"run dir {run_dir} does not exist; pass the run_dir of a training run")
    mpath = p / METRICS_FILE
    if not mpath.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}; pass the run_dir of a run that has logged steps")
    run = Run(name=p.resolve().name, path=p, tokens_per_step=0)
    with open(mpath, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)  # accepts the NaN a diverged loss is logged as
            except json.JSONDecodeError:
                run.skipped_lines += 1  # e.g. the last line of a run killed mid-write
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
                run.skipped_lines += 1
                continue
            step = rec["step"]
            if "loss" in rec:
                run.train.setdefault(step, {}).update(rec)
            if any(k.startswith("valid/") for k in rec):
                run.valid.setdefault(step, {}).update(rec)
            tasks = {k: v for k, v in rec.items() if k.startswith("task/") and not k.endswith("_vs_base")}
            if tasks:
                run.tasks.setdefault(step, {}).update(tasks)
    if not run.train and not run.valid and not run.tasks:
        raise UserError(f"{mpath} has no training or validation records; has the run logged a step yet?")
    if run.skipped_lines:
        print(f"warning: {mpath}: skipped {run.skipped_lines} unreadable lines", file=sys.stderr)
    run.tokens_per_step = _tokens_per_step(p, run)
    run.phase_tokens = _phase_tokens(p)
    return run


def _tokens_per_step(p: Path, run: Run) -> int:
    cpath = p / CONFIG_FILE
    if cpath.is_file():
        try:
            cfg = json.loads(cpath.read_text())["config"]
            return int(cfg["train"]["global_batch_size"]) * int(cfg["data"]["seq_len"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read train.global_batch_size and data.seq_len from {cpath} ({e}); "
                            f"restore the file written by megacpt train") from None
    # No resolved config: the cumulative per-source token counts give the same number.
    for step, rec in sorted(run.train.items(), reverse=True):
        counts = [v for k, v in rec.items() if k.startswith("tokens/") and _num(v) is not None]
        if step > 0 and counts:
            return round(sum(counts) / step)
    raise UserError(f"{p} has no {CONFIG_FILE} and its metrics carry no tokens/<source> counts, so tokens "
                    f"seen are unknown; restore {CONFIG_FILE} from the run")


def _phase_tokens(p: Path) -> list:
    try:
        cfg = config_from_dict(json.loads((p / CONFIG_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return []  # _tokens_per_step has already said what is wrong, or has another source
    return [(b.steps, b.tokens_per_step) for b in batch_shapes(cfg)]


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    names: dict[str, int] = {}
    for r in runs:
        if r.name in names:
            names[r.name] += 1
            r.name = f"{r.name} #{names[r.name]}"
        else:
            names[r.name] = 1


# ---------------------------------------------------------------------------------------------
# Series


def _series(records: dict, key: str, x_of) -> dict:
    xs, ys = [], []
    for step in sorted(records):
        rec = records[step]
        if key in rec:
            xs.append(x_of(step))
            ys.append(_num(rec[key]))
    return {"x": xs, "y": ys}


def _relative_series(r: Run, domain: str) -> dict:
    """ppl / base ppl per validation step: the logged ppl_vs_base, 1 at step 0 (the base itself),
    or ppl / ppl(step 0) where the run did not log the ratio."""
    key, rel_key = f"valid/{domain}/ppl", f"valid/{domain}/ppl_vs_base"
    base = _num(r.valid.get(0, {}).get(key))
    xs, ys = [], []
    for step in sorted(r.valid):
        rec = r.valid[step]
        if rel_key in rec:
            y = _num(rec[rel_key])
        elif key in rec and step == 0:
            y = 1.0
        elif key in rec and base:
            ppl = _num(rec[key])
            y = ppl / base if ppl is not None else None
        else:
            continue
        xs.append(r.tokens(step))
        ys.append(y)
    return {"x": xs, "y": ys}


def build_series(runs: list[Run]) -> dict:
    """Everything plotted, as plain data: {plot: {..., series: {run: {x, y}}} or panels: {domain: {run: ...}}}."""
    plots = {
        "loss": {"file": "loss.png", "title": "Training loss", "xlabel": "tokens seen", "ylabel": "loss",
                 "yscale": "log", "series": {}},
        "lr": {"file": "lr.png", "title": "Learning rate", "xlabel": "tokens seen", "ylabel": "learning rate",
               "yscale": "linear", "series": {}},
        "throughput": {"file": "throughput.png", "title": "Throughput per device", "xlabel": "step",
                       "ylabel": "tokens/s per device", "yscale": "linear", "series": {}},
        "valid_ppl": {"file": "valid_ppl.png", "title": "Validation perplexity (step 0 = base model)",
                      "xlabel": "tokens seen", "ylabel": "perplexity", "yscale": "log", "panels": {}},
        "valid_ppl_vs_base": {"file": "valid_ppl_vs_base.png",
                              "title": "Validation perplexity relative to the base model (<1 better, >1 worse)",
                              "xlabel": "tokens seen", "ylabel": "ppl / base ppl", "yscale": "auto", "panels": {}},
    }
    for r in runs:
        tok = r.tokens
        for key, plot, x_of in (("loss", "loss", tok), ("lr", "lr", tok),
                                ("tokens_per_s_per_device", "throughput", lambda s: int(s))):
            s = _series(r.train, key, x_of)
            if s["x"]:
                plots[plot]["series"][r.name] = s
        for d in r.domains():
            s = _series(r.valid, f"valid/{d}/ppl", tok)
            if s["x"]:
                plots["valid_ppl"]["panels"].setdefault(d, {})[r.name] = s
            rel = _relative_series(r, d)
            if len(rel["x"]) > 1 or (rel["x"] and rel["x"] != [0]):
                plots["valid_ppl_vs_base"]["panels"].setdefault(d, {})[r.name] = rel
    _task_series(runs, plots)
    _position_series(runs, plots)
    _classify_series(runs, plots)
    return plots


def _classify_series(runs: list[Run], plots: dict) -> None:
    """task: classify: per held-out set its loss beside the training sample's (the generalisation
    gap is the distance between them), the gap itself, accuracy and macro-F1."""
    spec = {"file": "classify.png", "title": "Classification: held-out vs training-sample loss, gap, accuracy",
            "xlabel": "tokens seen", "ylabel": "value", "yscale": "linear", "panels": {}}
    for r in runs:
        sets = sorted({k.split("/")[1] for rec in r.valid.values() for k in rec
                       if k.startswith("valid/") and k.endswith("/accuracy")})
        for d in sets:
            for panel, key in ((f"{d}: held-out loss", f"valid/{d}/loss"),
                               (f"{d}: training-sample loss", "train_sample/loss"),
                               (f"{d}: gap (held-out − training)", f"valid/{d}/gap"),
                               (f"{d}: accuracy", f"valid/{d}/accuracy"), (f"{d}: macro-F1", f"valid/{d}/macro_f1")):
                sr = _series(r.valid, key, r.tokens)
                if sr["x"]:
                    spec["panels"].setdefault(panel, {})[r.name] = sr
    if spec["panels"]:
        plots["classify"] = spec


def _position_series(runs: list[Run], plots: dict) -> None:
    """One plot per by-position set ("by_position:<name>"): each run's bucket losses at step 0
    (the base model) and at its last evaluation of the set."""
    for r in runs:
        for name in r.position_sets():
            steps = [s for s in sorted(r.valid) if any(k.startswith(f"valid/{name}/pos_") for k in r.valid[s])]
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            spec = plots.setdefault(f"by_position:{name}", {
                "file": f"by_position_{safe}.png", "title": f"{name}: loss by position (dashed: base model, step 0; "
                                                            f"solid: last evaluation)",
                "xlabel": "position in the document (bucket middle)", "ylabel": "loss", "yscale": "linear",
                "curves": {}})
            curves = {"last": r.position_curve(steps[-1], name)}
            if steps[0] == 0 and steps[-1] != 0:
                curves["base"] = r.position_curve(0, name)
            spec["curves"][r.name] = curves


def _task_series(runs: list[Run], plots: dict) -> None:
    """One plot per task ("task:<name>"), a panel per metric, and each run's base value."""
    for r in runs:
        for name, metrics in r.task_metrics().items():
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            spec = plots.setdefault(f"task:{name}", {
                "file": f"task_{safe}.png", "title": f"Task {name} (dashed: the base model, step 0)",
                "xlabel": "tokens seen", "ylabel": "value", "yscale": "linear", "panels": {}, "base": {}})
            for metric in metrics:
                key = f"task/{name}/{metric}"
                s = _series(r.tasks, key, r.tokens)
                if s["x"]:
                    spec["panels"].setdefault(metric, {})[r.name] = s
                base = _num(r.tasks.get(0, {}).get(key))
                if base is not None:
                    spec["base"].setdefault(metric, {})[r.name] = base


def final_values(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        row = {"run": r.name, "path": str(r.path), "tokens_per_step": r.tokens_per_step}
        if r.train:
            last = max(r.train)
            row.update(step=last, tokens=r.tokens(last), loss=_num(r.train[last].get("loss")))
            tps = sorted(v for v in (_num(rec.get("tokens_per_s_per_device")) for rec in r.train.values())
                         if v is not None)
            row["median_tokens_per_s_per_device"] = tps[len(tps) // 2] if tps else None
        domains = {}
        for d in r.domains():
            key = f"valid/{d}/ppl"
            steps = [s for s in sorted(r.valid) if _num(r.valid[s].get(key)) is not None]
            if not steps:
                continue
            base = _num(r.valid.get(0, {}).get(key))
            final = _num(r.valid[steps[-1]][key])
            logged_rel = _num(r.valid[steps[-1]].get(f"valid/{d}/ppl_vs_base"))
            domains[d] = {"step": steps[-1], "ppl": final, "base_ppl": base,
                          "ppl_vs_base": final / base if base else logged_rel}
        row["valid"] = domains
        row["tasks"] = {}
        for name, metrics in r.task_metrics().items():
            for metric in metrics:
                key = f"task/{name}/{metric}"
                steps = [s for s in sorted(r.tasks) if _num(r.tasks[s].get(key)) is not None]
                if steps:
                    base, final = _num(r.tasks.get(0, {}).get(key)), _num(r.tasks[steps[-1]][key])
                    row["tasks"][f"{name}/{metric}"] = {"step": steps[-1], "base": base, "final": final,
                                                        "vs_base": None if base is None else final - base}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Drawing


def _ema(ys: list, alpha: float) -> list:
    out, acc = [], None
    for y in ys:
        if y is not None:
            acc = y if acc is None else alpha * acc + (1 - alpha) * y
        out.append(acc if y is not None else None)
    return out


def _style_axes(ax, spec: dict, token_x: bool) -> None:
    from matplotlib import ticker  # optional dependency, and slow to import: only when plotting

    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(spec["ylabel"] + (" (log scale)" if ax.get_yscale() == "log" else ""))
    if token_x:
        ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def _plot_lines(ax, series: dict, colors: dict, spec: dict, smooth: bool = False) -> None:
    nan = float("nan")
    for name, s in series.items():
        ys = [nan if y is None else y for y in s["y"]]
        marker = "o" if len(ys) <= 30 else None
        if smooth and len(ys) > 50:
            ax.plot(s["x"], ys, color=colors[name], alpha=0.3, linewidth=0.8)
            sm = [nan if y is None else y for y in _ema(s["y"], 1 - 10 / len(ys) if len(ys) > 200 else 0.9)]
            ax.plot(s["x"], sm, color=colors[name], linewidth=1.8, label=f"{name} (smoothed)")
        else:
            ax.plot(s["x"], ys, color=colors[name], linewidth=1.6, marker=marker, markersize=3.5, label=name)
    ys = [y for s in series.values() for y in s["y"] if y is not None and y > 0]
    # "auto": log only when the values span enough to need it (ratios near 1 read better linear).
    if ys and (spec["yscale"] == "log" or (spec["yscale"] == "auto" and max(ys) / min(ys) >= AUTO_LOG_SPAN)):
        from matplotlib import ticker  # optional dependency, and slow to import: only when plotting

        ax.set_yscale("log")
        # Plain numbers ("3.5", not "3.5×10⁰"); minor ticks labelled too when the data spans little
        # more than a decade, as loss and perplexity curves usually do.
        plain = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        if max(ys) / min(ys) < 30:
            ax.yaxis.set_minor_formatter(plain)
        else:
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _figure(w: float, h: float):
    # Optional dependency, and slow to import: only when plotting. Agg directly: no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def draw(plots: dict, colors: dict, out: Path) -> list[str]:
    """Write the PNGs; returns the plot keys written."""
    written = []
    for key in ("loss", "lr", "throughput"):
        spec = plots[key]
        if not spec["series"]:
            continue
        fig = _figure(8, 4.8)
        ax = fig.add_subplot()
        _plot_lines(ax, spec["series"], colors, spec, smooth=key == "loss")
        _style_axes(ax, spec, token_x=spec["xlabel"] == "tokens seen")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.set_ylim(bottom=0)
        if key == "throughput":
            ax.set_ylim(bottom=0)
        ax.set_title(spec["title"])
        ax.legend(loc="best", fontsize="small")
        _save(fig, out / spec["file"])
        written.append(key)
    for key, spec in plots.items():
        if spec.get("panels"):
            _draw_panels(key, spec, colors, out)
            written.append(key)
        elif spec.get("curves"):
            _draw_positions(spec, colors, out)
            written.append(key)
    return written


def _draw_positions(spec: dict, colors: dict, out: Path) -> None:
    fig = _figure(8, 4.8)
    ax = fig.add_subplot()
    nan = float("nan")
    for run, curves in spec["curves"].items():
        for which, style in (("base", "--"), ("last", "-")):
            c = curves.get(which)
            if c and c["x"]:
                ax.plot(c["x"], [nan if y is None else y for y in c["y"]], color=colors[run], linestyle=style,
                        marker="o", markersize=3.5, label=f"{run} (step {c['step']})")
    _style_axes(ax, spec, token_x=True)  # positions read like token counts: 32k
    ax.set_title(spec["title"], fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    _save(fig, out / spec["file"])


def _draw_panels(key: str, spec: dict, colors: dict, out: Path) -> None:
    panels = spec["panels"]
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(4.6 * cols + 0.6, 3.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (panel, series) in enumerate(panels.items()):
        ax = axes[i // cols][i % cols]
        _plot_lines(ax, series, colors, spec)
        if key == "valid_ppl_vs_base":
            ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
        for run, base in spec.get("base", {}).get(panel, {}).items():
            ax.axhline(base, color=colors[run], linestyle="--", linewidth=1)
        _style_axes(ax, spec, token_x=True)
        ax.set_title(panel)
        ax.legend(loc="best", fontsize="small")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(spec["title"])
    _save(fig, out / spec["file"])


# ---------------------------------------------------------------------------------------------
# HTML


def _fmt(v, kind="g") -> str:
    if v is None:
        return "–"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "tokens":
        for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.3g}{unit}"
        return str(int(v))
    if kind == "ratio":
        return f"×{v:.3f}"
    return f"{v:.4g}"


def _task_cell(v: dict | None) -> str:
    if v is None:
        return "<td>–</td>"
    return f"<td>{_fmt(v['base'])} → {_fmt(v['final'])}</td>"


def render_html(plots: dict, written: list[str], table: list[dict]) -> str:
    e = html.escape
    domains = []
    for row in table:
        for d in row["valid"]:
            if d not in domains:
                domains.append(d)
    metrics = list(dict.fromkeys(m for row in table for m in row.get("tasks", {})))
    head = ["run", "steps", "tokens seen", "final train loss", "median tokens/s/device"]
    for d in domains:
        head += [f"{d} ppl (base → final)", f"{d} ppl / base"]
    head += [f"{m} (base → final)" for m in metrics]
    body = []
    for row in table:
        cells = [f'<td title="{e(row["path"])}">{e(row["run"])}</td>', f"<td>{_fmt(row.get('step'), 'int')}</td>",
                 f"<td>{_fmt(row.get('tokens'), 'tokens')}</td>", f"<td>{_fmt(row.get('loss'))}</td>",
                 f"<td>{_fmt(row.get('median_tokens_per_s_per_device'))}</td>"]
        for d in domains:
            v = row["valid"].get(d)
            if v is None:
                cells += ["<td>–</td>", "<td>–</td>"]
                continue
            ratio = v["ppl_vs_base"]
            cls = "" if ratio is None else (' class="better"' if ratio < 1 else ' class="worse"')
            cells += [f"<td>{_fmt(v['base_ppl'])} → {_fmt(v['ppl'])}</td>", f"<td{cls}>{_fmt(ratio, 'ratio')}</td>"]
        cells += [_task_cell(row.get("tasks", {}).get(m)) for m in metrics]
        body.append("<tr>" + "".join(cells) + "</tr>")
    figs = []
    for key in written:
        spec = plots[key]
        figs.append(f'<figure><img src="{e(spec["file"])}" alt="{e(spec["title"])}">'
                    f"<figcaption>{e(spec['title'])}</figcaption></figure>")
    runs = "".join(f"<li><b>{e(r['run'])}</b>: {e(r['path'])} ({r['tokens_per_step']:,} tokens/step)</li>"
                   for r in table)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>megacpt report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
td.better {{ color: #1a7f37; }} td.worse {{ color: #b42318; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>megacpt report</h1>
<ul>{runs}</ul>
<h2>Final values</h2>
<table><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr></thead>
<tbody>{''.join(body)}</tbody></table>
<p>ppl / base: the run's last validation perplexity over the base model's (step 0); below 1 the domain
improved, above 1 it got worse (forgetting, on the original domain). Task columns: the lm-eval
metric of the base model (step 0) and at the run's last task evaluation.
Data behind the plots: <a href="report.json">report.json</a>.</p>
<h2>Plots</h2>
{''.join(figs)}
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# Entry points


def report(run_dirs, output) -> dict:
    """Write the plots, report.json and index.html for `run_dirs` into `output`; returns report.json's data."""
    if not run_dirs:
        raise UserError("no run dirs given; pass at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output} exists and is not a directory; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    plots = build_series(runs)
    from matplotlib import colormaps  # optional dependency, and slow to import: only when plotting

    palette = colormaps["tab10"].colors
    colors = {r.name: palette[i % len(palette)] for i, r in enumerate(runs)}
    written = draw(plots, colors, out)
    table = final_values(runs)
    data = {"runs": table, "plots": {k: plots[k] for k in written}}
    atomic.write_text(out / "report.json", json.dumps(data, indent=1) + "\n")
    atomic.write_text(out / "index.html", render_html(plots, written, table))
    return data


def run(args) -> int:
    """`megacpt report` (parser: megacpt/cli/report.py)."""
    data = report(args.run_dirs, args.output)
    files = [p["file"] for p in data["plots"].values()]
    print(f"wrote {Path(args.output) / 'index.html'} ({len(data['runs'])} runs; {', '.join(files)})")
    return 0
