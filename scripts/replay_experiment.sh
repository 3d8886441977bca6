#!/usr/bin/env bash
# The CPT experiment in miniature (docs/REPLAY.md): the real SmolLM2-135M continued on German with
# 0 %, 5 % and 25 % replay of English (configs/replay/), then one report over the three runs and a
# table of the measured perplexities. One process per arm (ZeRO-0, fp32, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=.venv/bin/python
bash scripts/demo_data.sh
runs=()
for arm in 00 05 25; do
  run="work/runs/replay_$arm"
  $PY -m megacpt.train "configs/replay/replay_$arm.yaml"  # resumes (or does nothing) if already run
  runs+=("$run")
done
.venv/bin/megacpt report "${runs[@]}" --output work/reports/replay
$PY - "${runs[@]}" <<'PY'
import json, sys
print("| replay | new (German) ppl: base → end | original (English man pages) ppl: base → end | English ppl vs base "
      "| German probe acc: base → end | English cloze acc: base → end |")
print("|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    recs = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    ev = [r for r in recs if "valid/new/ppl" in r]
    tk = [r for r in recs if "task/probe_en_cloze/acc" in r]
    first, last = ev[0], ev[-1]
    arm = run.rsplit("_", 1)[1].lstrip("0") or "0"
    print(f"| {arm} % | {first['valid/new/ppl']:.2f} → {last['valid/new/ppl']:.2f} | "
          f"{first['valid/original/ppl']:.2f} → {last['valid/original/ppl']:.2f} | "
          f"{last['valid/original/ppl'] / first['valid/original/ppl']:.3f}× | "
          f"{tk[0]['task/probe_de_continuation/acc']:.3f} → {tk[-1]['task/probe_de_continuation/acc']:.3f} | "
          f"{tk[0]['task/probe_en_cloze/acc']:.3f} → {tk[-1]['task/probe_en_cloze/acc']:.3f} |")
PY
echo "report: work/reports/replay/index.html"
