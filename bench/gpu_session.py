"""The record of one `bench/gpu_session.sh` run: ONE JSON file, rewritten after every part so
that a part that fails, or a session cut off by its lease, still leaves everything measured so far.

    python bench/gpu_session.py start  SESSION.json --run-id ID --budget S [--dry-run]
    python bench/gpu_session.py record SESSION.json --part NAME --rc RC --seconds S --limit S --log LOG
                                       --log-offset BYTES [--json PART.json] -- COMMAND...
    python bench/gpu_session.py skip   SESSION.json --part NAME --reason TEXT
    python bench/gpu_session.py finish SESSION.json        (end time, clocks again, schema check)
    python bench/gpu_session.py check  SESSION.json        (exit 1 and one line per problem)
    python bench/gpu_session.py digest                     (the source digest of this checkout)

The document: versions (python, torch + its CUDA, triton, deepspeed, transformers, torchao),
commit (git, else $MEGACPT_COMMIT: the device's copy of the tree has no .git), source_digest
(sha256 of the Python and shell sources, comparable with `digest` here), the card
(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,... at the start and the end),
every part's status, exit code, seconds, limit, command and its own JSON, and a summary with the
figures the issue asks for (MFU with the FLOPs per token and the peak it is taken against).
Needs only the standard library (it never imports torch: seconds per call).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
PARTS = ("setup", "anatomy", "train", "loss", "fp8")
STATUSES = ("ok", "failed", "timeout", "refused", "skipped")
KINDS = ("gemm", "attention", "loss", "optimizer", "elementwise", "communication", "other")
SMI_FIELDS = ("name", "clocks.sm", "clocks.max.sm", "power.limit", "clocks.mem", "power.draw", "temperature.gpu",
              "driver_version", "memory.total")
PACKAGES = ("torch", "triton", "deepspeed", "transformers", "accelerate", "torchao", "liger-kernel", "numpy")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def source_digest(root: Path = REPO) -> str:
    h = hashlib.sha256()
    files = sorted(p for pat in ("megacpt/**/*.py", "kernels/**/*.py", "bench/*.py", "bench/*.sh", "setup.py")
                   for p in root.glob(pat))
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        r = None
    if r is not None and r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    return os.environ.get("MEGACPT_COMMIT") or None


def nvidia_smi() -> tuple[dict | None, str | None]:
    """The card's name, clocks and power limit (numbers without units), or None and why."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{' '.join(cmd[:2])}: {type(e).__name__}: {e}"
    if r.returncode != 0 or not r.stdout.strip():
        return None, f"nvidia-smi exited {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}"
    values = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
    out = {"query": cmd[1], "raw": r.stdout.strip().splitlines()[0]}
    for field, value in zip(SMI_FIELDS, values):
        key = field.replace(".", "_")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    # The names the report reads, with units.
    out["clocks_sm_mhz"], out["clocks_max_sm_mhz"] = out.pop("clocks_sm", None), out.pop("clocks_max_sm", None)
    out["power_limit_w"] = out.pop("power_limit", None)
    return out, None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch_cuda"] = _torch_cuda()
    return out


def _torch_cuda() -> str | None:
    """The CUDA version torch was built with, read from torch/version.py (importing torch takes seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda(?::[^=]*)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def start(a) -> dict:
    gpu, why = nvidia_smi()
    return {"benchmark": "gpu_session", "schema_version": SCHEMA_VERSION, "run_id": a.run_id,
            "dry_run": a.dry_run, "parts_requested": ["setup"] + a.parts.split(","), "started": now(), "finished": None, "budget_s": a.budget, "elapsed_s": None,
            "commit": commit(), "source_digest": source_digest(), "versions": versions(),
            "host": {"machine": platform.machine(), "cpu_count": os.cpu_count()},
            "gpu": gpu, "gpu_error": why, "gpu_end": None, "parts": {}, "summary": {}, "schema_problems": None}


def _log_lines(log: Path, offset: int, n: int = 30) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip() and not line.startswith("=== ")][-n:]


def part_record(a) -> dict:
    """A part's status: ok, timeout (124/137 from `timeout`), refused (exit 2: a one-line user
    error, e.g. fp8 on a machine without fp8), failed (anything else, or no JSON where one was due)."""
    data = None
    if a.json and Path(a.json).is_file():
        try:
            data = json.loads(Path(a.json).read_text())
        except json.JSONDecodeError as e:
            data = {"unreadable": str(e)}
    lines = _log_lines(Path(a.log), a.log_offset) if a.log else []
    status = {0: "ok", 2: "refused", 124: "timeout", 137: "timeout"}.get(a.rc, "failed")
    if status == "ok" and a.json and data is None:
        status = "failed"
    rec = {"status": status, "rc": a.rc, "seconds": a.seconds, "limit_s": a.limit, "command": a.command,
           "json": data}
    if status == "refused":
        errors = [line for line in lines if line.startswith("error: ")]
        rec["message"] = errors[-1] if errors else (lines[-1] if lines else None)
    elif status != "ok":
        rec["log_tail"] = lines
    return rec


def summary(parts: dict) -> dict:
    """The figures of the issue, taken from the parts' own JSON (None where a part did not run)."""
    out: dict = {}
    train = (parts.get("train") or {}).get("json") or {}
    res = train.get("results", {})
    if "megacpt" in res:
        m, ratio = res["megacpt"], train.get("ratios", {}).get("hf-deepspeed", {})
        out["train"] = {"device": train.get("device"), "precision": train.get("setup", {}).get("precision"),
                        "tokens_per_s": m["tokens_per_s"], "mfu": m["mfu"],
                        "flops_per_token": train.get("flops_per_token"),
                        "peak_flops": train.get("dense_bf16_peak_flops"), "peak_basis": "dense bf16",
                        "step_time_median_s": m["step_time"]["median_s"],
                        "peak_memory_mb_per_rank": m["peak_memory_mb_per_rank"],
                        "peer_a_tokens_per_s": res.get("hf-deepspeed", {}).get("tokens_per_s"),
                        "ratio_vs_peer_a": ratio.get("median"), "ratio_vs_peer_a_per_round": ratio.get("per_round")}
    anatomy = (parts.get("anatomy") or {}).get("json") or {}
    if "median" in anatomy:
        out["anatomy"] = {**anatomy["median"], "mfu_from_total": anatomy.get("mfu_from_total"),
                          "by_kind_ms": {k: v["ms"] for k, v in anatomy["profile"]["by_kind"].items()},
                          "compiled_ms": anatomy["profile"]["compiled_ms"]}
    loss = (parts.get("loss") or {}).get("json") or {}
    if loss.get("results"):
        out["loss"] = {f"{r['impl']} {r['n']}x{r['h']}x{r['v']}": {"ms": None if r.get("time_s") is None
                                                                  else r["time_s"] * 1e3,
                                                                  "peak_extra_mb": (r.get("peak_extra_bytes") or 0) / 2**20,
                                                                  "error": r.get("error")}
                       for r in loss["results"]}
    out["fp8"] = _fp8_summary(parts, train)
    return out


def _fp8_summary(parts: dict, bf16_train: dict) -> dict | None:
    """fp8 beside bf16, never pooled: its throughput, and its losses against the bf16 megacpt run
    of the train part (same model init, same tokens) step by step."""
    fp8 = parts.get("fp8") or {}
    doc = fp8.get("json") or {}
    if "results" not in doc:
        return {"status": fp8.get("status"), "message": fp8.get("message")} if fp8 else None
    m = doc["results"]["megacpt"]
    out = {"status": fp8["status"], "tokens_per_s": m["tokens_per_s"], "mfu_vs_bf16_peak": m["mfu"],
           "peak_memory_mb_per_rank": m["peak_memory_mb_per_rank"]}
    bf16_runs = [r for r in bf16_train.get("runs", []) if r["system"] == "megacpt"]
    fp8_runs = [r for r in doc.get("runs", []) if r["system"] == "megacpt"]
    if bf16_runs and fp8_runs:
        pairs = list(zip(bf16_runs[0]["losses"], fp8_runs[0]["losses"]))
        out["max_rel_loss_diff_vs_bf16"] = max(abs(a - b) / abs(a) for a, b in pairs) if pairs else None
        bf16_tps = bf16_train["results"]["megacpt"]["tokens_per_s"]
        out["speedup_vs_bf16"] = m["tokens_per_s"] / bf16_tps if bf16_tps else None
    return out


# ----------------------------------------------------------------------------- schema


def problems(doc: dict) -> list[str]:
    """What is missing or malformed in a session document (the dry run must give none)."""
    out = []
    for key in ("benchmark", "schema_version", "run_id", "dry_run", "parts_requested", "started", "finished", "budget_s", "elapsed_s",
                "commit", "source_digest", "versions", "gpu", "gpu_error", "parts", "summary"):
        if key not in doc:
            out.append(f"missing top-level key {key}")
    if out:
        return out
    for pkg in ("python", "torch", "torch_cuda", "triton", "deepspeed", "transformers", "torchao"):
        if pkg not in doc["versions"]:
            out.append(f"versions lacks {pkg}")
    if not doc["dry_run"]:
        gpu = doc["gpu"] or {}
        for key in ("name", "clocks_sm_mhz", "clocks_max_sm_mhz", "power_limit_w"):
            if gpu.get(key) in (None, ""):
                out.append(f"gpu.{key} missing ({doc['gpu_error']})")
    elif doc["gpu"] is None and not doc["gpu_error"]:
        out.append("no gpu record and no gpu_error")
    out += [f"part {name} was requested but has no record" for name in doc["parts_requested"]
            if name not in doc["parts"]]
    for name, rec in doc["parts"].items():
        if rec.get("status") not in STATUSES:
            out.append(f"part {name}: status {rec.get('status')!r}")
        elif rec["status"] == "ok":
            out += [f"part {name}: {p}" for p in CHECKS.get(name, lambda d, dry: [])(rec["json"], doc["dry_run"])]
        elif rec["status"] == "refused" and (not rec.get("message") or "\n" in rec["message"]):
            out.append(f"part {name}: refused without a one-line message")
    return out


def _check_anatomy(d: dict, dry: bool) -> list[str]:
    out = [f"median.{k} missing" for k in ("forward_ms", "backward_ms", "optimizer_ms", "host_gap_ms", "total_ms")
           if (d.get("median") or {}).get(k) is None]
    by_kind = (d.get("profile") or {}).get("by_kind") or {}
    out += [f"profile.by_kind lacks {k}" for k in KINDS if k not in by_kind]
    if not dry and d.get("timing") != "cuda events":
        out.append(f"timing is {d.get('timing')!r}, not cuda events")
    for key in ("flops_per_token", "tokens_per_step", "peak_memory_mb"):
        if not d.get(key):
            out.append(f"{key} missing")
    return out


def _check_train(d: dict, dry: bool) -> list[str]:
    out = []
    res = d.get("results", {})
    for system in ("megacpt", "hf-deepspeed"):
        if system not in res:
            out.append(f"results lack {system}")
    rounds = d.get("setup", {}).get("repeats", 0)
    want = [f"{s}-r{r}" for r in range(1, rounds + 1) for s in ("megacpt", "hf-deepspeed")]
    if d.get("order") != want:
        out.append(f"runs not interleaved A B A B: {d.get('order')}")
    if not dry:
        if rounds < 2:
            out.append(f"{rounds} round(s), at least 2 wanted")
        short = [r["system"] for r in d.get("runs", []) if len(r["timed_step_times_s"]) < 10]
        if short:
            out.append(f"fewer than 10 timed steps in runs of {short}")
        if not d.get("dense_bf16_peak_flops") or res.get("megacpt", {}).get("mfu") is None:
            out.append("no MFU (unknown peak for this card?)")
    if not d.get("flops_per_token"):
        out.append("flops_per_token missing")
    if "megacpt" in res and not all(m for m in res["megacpt"]["peak_memory_mb_per_rank"][:1]):
        out.append("megacpt peak memory missing")
    return out


def _check_loss(d: dict, dry: bool) -> list[str]:
    rows = d.get("results") or []
    out = [] if rows else ["no results"]
    out += [f"row {r.get('impl')} has neither time_s nor error" for r in rows if "time_s" not in r and "error" not in r]
    if not any(r.get("impl") == "eager" for r in rows):
        out.append("no eager row")
    return out


def _check_fp8(d: dict, dry: bool) -> list[str]:
    return [] if d.get("setup", {}).get("precision") == "fp8" else ["the fp8 run's setup.precision is not fp8"]


CHECKS = {"anatomy": _check_anatomy, "train": _check_train, "loss": _check_loss, "fp8": _check_fp8}


# ----------------------------------------------------------------------------- commands


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("session")
    s.add_argument("--run-id", required=True)
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--parts", default=",".join(PARTS[1:]), help="the parts this run will record (comma-separated)")
    r = sub.add_parser("record")
    r.add_argument("session")
    r.add_argument("--part", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--limit", type=float, required=True)
    r.add_argument("--json", default=None)
    r.add_argument("--log", default=None)
    r.add_argument("--log-offset", type=int, default=0)
    k = sub.add_parser("skip")
    k.add_argument("session")
    k.add_argument("--part", required=True)
    k.add_argument("--reason", required=True)
    for name in ("finish", "check"):
        sub.add_parser(name).add_argument("session")
    sub.add_parser("digest")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `record ... -- COMMAND...`: the part's command line, kept out of argparse's way.
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.command = command
    if a.cmd == "digest":
        print(source_digest())
        return 0
    path = Path(a.session)
    if a.cmd == "start":
        write(path, start(a))
        return 0
    doc = json.loads(path.read_text())
    if a.cmd == "check":
        found = problems(doc)
        for line in found:
            print(line)
        return 1 if found else 0
    if a.cmd == "record":
        doc["parts"][a.part] = part_record(a)
    elif a.cmd == "skip":
        doc["parts"][a.part] = {"status": "skipped", "reason": a.reason, "json": None}
    elif a.cmd == "finish":
        doc["finished"] = now()
        started = datetime.datetime.strptime(doc["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        doc["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        doc["gpu_end"] = nvidia_smi()[0]
    doc["summary"] = summary(doc["parts"])
    if a.cmd == "finish":
        doc["schema_problems"] = problems(doc)
    write(path, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
