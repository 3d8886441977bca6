"""Weights & Biases and MLflow beside metrics.jsonl (TensorBoard stays in metrics.py).

Rank 0's MetricsLogger hands every record that metrics.jsonl gets (training steps, validation,
task metrics; not the `event` records, which are not series) to the trackers named in
`logging.backends`, numbers only. Both packages are optional: they are imported when a run asks
for them, and a tracker that is missing, fails to start or fails later costs one warning line,
never the run (metrics.jsonl is the record of truth).

- W&B: offline unless WANDB_MODE says otherwise, files in run_dir/wandb (`wandb sync` uploads
  them), run name = the run_dir's name, config = the resolved config, tags = logging.tags + task.
- MLflow: sqlite:///run_dir/mlflow.db unless MLFLOW_TRACKING_URI; experiment = logging.project,
  params = the resolved config flattened.
A resumed run continues the same tracker runs: their ids are kept in run_dir/trackers.json.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from megacpt.atomic import write_json
from megacpt.config import flatten

IDS_FILE = "trackers.json"
PIP = {"wandb": "wandb==0.31.0", "mlflow": "mlflow-skinny==3.18.0 sqlalchemy alembic"}
# MLflow accepts these characters in metric and param names; others become "_".
_MLFLOW_BAD = re.compile(r"[^\w\-. /:]")


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def numbers(record: dict) -> dict:
    """The numeric fields of a metrics.jsonl record, `step` excepted (bools and nulls are not numbers)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else type(e).__name__)


def _read_ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_id(run_dir: Path, name: str, value) -> None:
    ids = _read_ids(run_dir)
    ids[name] = value
    write_json(run_dir / IDS_FILE, ids)


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str, tags: list[str]):
        # Optional and slow to import (about a second): only runs that ask for W&B pay for it.
        import wandb

        run_id = _read_ids(run_dir).get("wandb")  # None the first time: W&B makes one, kept below
        # console off: the launcher's log already has the console, and rank 0's stdout stays unwrapped.
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE") or "offline", config=config, tags=tags,
                              settings=wandb.Settings(console="off", quiet=True))
        _save_id(run_dir, "wandb", self.run.id)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict, project: str, tags: list[str]):
        # Optional (mlflow-skinny + SQLAlchemy) and slow to import: only runs that ask for MLflow pay for it.
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        saved = _read_ids(run_dir).get("mlflow") or {}
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                return
            except MlflowException:  # not in this store any more (e.g. mlflow.db deleted): start a new run
                warn(f"MLflow run {self.run_id} is not in {uri}; logging to a new run")
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={t: "true" for t in tags})
        self.run_id = run.info.run_id
        self._log_params(config)
        _save_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param  # optional package, imported only when MLflow is in use

        # Params are set once, when the run is created: MLflow refuses a changed value later (a
        # resume may change resume-safe keys), and MLflow caps a value at 6000 characters.
        params = [Param(_MLFLOW_BAD.sub("_", k), (v if isinstance(v, str) else json.dumps(v))[:6000])
                  for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric  # optional package, imported only when MLflow is in use

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_BAD.sub("_", k), float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


OPENERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(names, run_dir, config: dict, project: str, tags: list[str]) -> list:
    """The trackers among `names` that start; one warning line for each that does not."""
    out = []
    for name in names:
        if name not in OPENERS:
            continue
        try:
            out.append(OPENERS[name](Path(run_dir), config, project, tags))
        except ImportError as e:
            warn(f"{name} is not installed ({_first_line(e)}): pip install {PIP[name]}; metrics still go to "
                 f"metrics.jsonl")
        except Exception as e:  # a tracker is a convenience: whatever stops it must not stop training
            warn(f"{name} could not start ({type(e).__name__}: {_first_line(e)}); metrics still go to metrics.jsonl")
    return out


class Trackers:
    """The started trackers; one that fails while logging or closing is warned about once and dropped."""

    def __init__(self, trackers: list):
        self.active = list(trackers)

    def _each(self, what: str, call) -> None:
        for t in list(self.active):
            try:
                call(t)
            except Exception as e:  # see open_trackers
                self.active.remove(t)
                warn(f"{t.name} failed while {what} ({type(e).__name__}: {_first_line(e)}); it is left out from "
                     f"here on, metrics.jsonl has everything")

    def log(self, record: dict) -> None:
        if "event" in record or not self.active:
            return
        values = numbers(record)
        if values:
            self._each("logging", lambda t: t.log(int(record["step"]), values))

    def close(self) -> None:
        self._each("closing", lambda t: t.close())
        self.active = []
