"""The state one training run shares between its pieces (start, build, loop, evaluation,
checkpointing, rollback), so that they take one object instead of long argument lists."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

from megacpt.config import Config, Derived
from megacpt.models.llama import ModelArgs


@dataclass
class Start:
    """What a run starts from, decided before any process group exists."""
    base_cfg: dict  # the HF config.json the model's shape comes from
    source_dir: str | None = None  # the HF dir the run came from (tokenizer files for export)
    resume_dir: Path | None = None  # the checkpoint resumed (None: init_from)
    state: dict | None = None  # that checkpoint's megacpt state
    weights: object = None  # HF dir or WeightSource this rank loads; None: a checkpoint loads over the init
    relayout: bool = False  # resumed in another tp/pp layout: weights and moments re-sliced by us
    finished: bool = False  # the run stopped early before: nothing to do
    notes: list = field(default_factory=list)  # lines rank 0 says at the resume (a damaged checkpoint skipped)


@dataclass
class RunState:
    cfg: Config
    derived: Derived
    start: Start
    args: ModelArgs
    hf_cfg: dict
    adapter: object = None  # models/lora.py LoRASpec: the adapter resolved against the model (None: full FT)
    rank: int = 0
    world: int = 1
    caching_malloc: bool = False
    # data
    phases: list = field(default_factory=list)
    valid: dict = field(default_factory=dict)  # name -> eval windows (or SFT eval sets)
    tokenizer: object = None  # SFT only
    labels: list = field(default_factory=list)  # task: classify: the head's label names
    sft_cut: int = 0
    # built
    topo: object = None
    dtype: object = None
    ds_config: dict | None = None
    load_tag: str | None = None  # the checkpoint tag DeepSpeed loads on resume
    moments: tuple | None = None  # re-sliced Adam moments of a re-layout resume
    layout_changed_at: int | None = None  # checkpoints up to this step are in another layout
    engine: object = None
    pipe_run: object = None  # PipelineRun when parallel.pp > 1
    saver: object = None  # async_save.py AsyncSaver when checkpoint.async
    cp: object = None  # parallel/cp.py UlyssesAttention when parallel.cp > 1
    stages: object = None
    group_decay: list = field(default_factory=list)
    # progress
    step: int = 0
    base_valid: dict = field(default_factory=dict)
    base_tasks: dict = field(default_factory=dict)  # task/<name>/<metric> of the base model (step 0)
    task_eval: object = None  # train/task_eval.py TaskEval when eval.tasks is set
    skips: dict = field(default_factory=dict)  # phase name -> data batch indices skipped after rollbacks
    early_stopper: object = None
    rollbacks: int = 0
    steps_this_run: int = 0
    last_saved: int = -1
    stopped_by: str | None = None
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))  # losses, for spikes
    ahead: tuple | None = None  # ((phase name, data batch), loop.step_batches) built during the previous step
    where: dict = field(default_factory=lambda: {"op": "start"})  # what the step does, to name a timed-out collective
    logger: object = None
    peak_flops: float | None = None  # the device's dense bf16 peak, for MFU (None on CPUs)
    bar: object = None
    stopper: object = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.run_dir) / "checkpoints"

    @property
    def total_steps(self) -> int:
        return self.phases[-1].start + self.phases[-1].steps

    @property
    def sft(self) -> bool:
        return self.cfg.task == "sft"

    @property
    def classify(self) -> bool:
        return self.cfg.task == "classify"

    def say(self, msg: str) -> None:
        """A line on rank 0's console (through the progress bar when there is one)."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
