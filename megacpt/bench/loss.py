"""`megacpt bench loss`: memory and time of the LM-head loss, ours against the alternatives.

Each implementation computes mean cross-entropy of hidden @ weight.T over N tokens and its
gradients w.r.t. hidden and weight (forward + backward), on the same inputs:
  ours           megacpt.kernels.linear_cross_entropy, impl="auto" (on CUDA with triton: cuBLAS
                 GEMMs per logits chunk + one Triton pass over it; on CPU: the eager chunk loop)
  ours-chunked-triton  impl="chunked-triton": that CUDA path by name (CUDA with triton only)
  ours-torch     impl="torch": the chunk loop with eager pointwise ops (only listed on CUDA)
  eager          F.cross_entropy(F.linear(hidden, weight).float(), targets) -- what HF models do
  torch-chunked  torch.nn.functional.linear_cross_entropy with options=LinearCrossEntropyOptions()
                 (PyTorch's own chunked path; absent before PyTorch 2.13)
  liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA, when installed)

Time: median wall time of --repeats runs after --warmup runs (torch.cuda.synchronize on CUDA),
the implementations taking turns run by run (A B C, A B C, ...) so that a shared machine's load
swings hit each alike.
Peak extra memory: bytes allocated on top of the inputs at the high-water mark of one separate,
untimed run (the gradients of hidden and weight are included: they are the floor every
implementation must pay, reported as "floor").
  * CUDA: torch.cuda.max_memory_allocated() minus the allocation before the run.
  * CPU: there is no allocator high-water mark, so a TorchDispatchMode (LiveStorageTracker) adds
    up the storage of every tensor an aten op returns while it is alive (freed when its last
    tensor is garbage-collected, by refcount) and records the maximum. Views of the inputs are not
    counted. It misses scratch memory allocated *inside* a single kernel (e.g. BLAS workspace),
    which is small next to N x V logits.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megacpt.errors import UserError
from megacpt.kernels import linear_cross_entropy
from megacpt.kernels.capabilities import CAPS

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_IMPLS = ("ours", "ours-chunked-triton", "ours-torch", "eager", "torch-chunked", "liger")
# CUDA: the Llama-3.2-1B head of issue 23's target (N=4096 tokens), then an 8B-sized one.
_DEFAULT_SHAPES = {"cpu": ["4096,256,32768"], "cuda": ["4096,2048,128256", "8192,4096,128256"]}


class LiveStorageTracker:
    """High-water mark of the bytes held by tensors created inside the `with` block (CPU or any).

    Implemented as a TorchDispatchMode: sees every aten op, forward and backward (the autograd
    engine runs CPU backward on the calling thread, inside the mode).
    """

    def __init__(self, preexisting=()):
        tracker = self
        self.ignore = {t.untyped_storage().data_ptr() for t in preexisting}
        self.live: Dict[int, List[int]] = {}  # storage data_ptr -> [nbytes, live tensor count]
        self.current = 0
        self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track_tree(out)
                return out

        self._mode = _Mode()

    def _track_tree(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)

    def _track(self, t) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.ignore:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _implementations(device: str) -> Dict[str, Optional[Callable]]:
    """name -> fn(hidden, weight, targets) -> loss, or None with the reason kept separately."""
    impls: Dict[str, Optional[Callable]] = {
        "ours": lambda h, w, t: linear_cross_entropy(h, w, t, impl="auto"),
        "eager": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
    }
    if device == "cuda":
        if CAPS.triton:
            impls["ours-chunked-triton"] = lambda h, w, t: linear_cross_entropy(h, w, t, impl="chunked-triton")
        impls["ours-torch"] = lambda h, w, t: linear_cross_entropy(h, w, t, impl="torch")
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        impls["torch-chunked"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts)
    if device == "cuda":
        try:
            # optional peer, only where it is installed
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = lambda h, w, t: liger(w, h, t)
        except ImportError:
            pass
    return impls


def _versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            out[mod] = None
    return out


def _step(fn: Callable, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_and_loss(fn: Callable, hidden, weight, targets, *, device: str) -> dict:
    """Peak extra memory and the loss value of one separate, untimed run."""
    hidden.grad = weight.grad = None
    if device == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = _step(fn, hidden, weight, targets)
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveStorageTracker(preexisting=(hidden, weight, targets)) as tracker:
            loss = _step(fn, hidden, weight, targets)
        peak = tracker.peak
    loss_value = float(loss.detach().float())
    hidden.grad = weight.grad = None
    return dict(peak_extra_bytes=int(peak), loss=loss_value)


def _time_once(fn: Callable, hidden, weight, targets, *, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _step(fn, hidden, weight, targets)
    _sync(device)
    return time.perf_counter() - t0


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _drop_after_error(e: Exception, row: dict, hidden, weight, device: str) -> None:
    row["error"] = _error_text(e)
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure_all(fns: Dict[str, Callable], rows: Dict[str, dict], hidden, weight, targets, *,
                 device: str, repeats: int, warmup: int) -> None:
    """Memory of each implementation on its own, then timed runs interleaved round by round (A B
    C, A B C, ...), so that a shared machine's load swings hit every implementation alike."""
    ok = []
    for name, fn in fns.items():
        try:
            rows[name].update(_memory_and_loss(fn, hidden, weight, targets, device=device))
            for _ in range(warmup):
                _step(fn, hidden, weight, targets)
            ok.append(name)
        except Exception as e:  # noqa: BLE001 -- e.g. OOM for eager: record and go on
            _drop_after_error(e, rows[name], hidden, weight, device)
    times: Dict[str, List[float]] = {name: [] for name in ok}
    for _ in range(repeats):
        for name in list(ok):
            try:
                times[name].append(_time_once(fns[name], hidden, weight, targets, device=device))
            except Exception as e:  # noqa: BLE001
                _drop_after_error(e, rows[name], hidden, weight, device)
                ok.remove(name)
    hidden.grad = weight.grad = None
    for name in ok:
        rows[name].update(time_s=statistics.median(times[name]), times_s=times[name])


def run_loss_bench(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, _DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")])
    shapes = []
    for spec in args.shape or _DEFAULT_SHAPES[device]:
        try:
            n, h, v = (int(x) for x in spec.split(","))
        except ValueError:
            raise UserError(f"--shape must be N,H,V (three integers), got {spec!r}") from None
        if min(n, h, v) <= 0:
            raise UserError(f"--shape values must be positive, got {spec!r}")
        shapes.append((n, h, v))
    if args.repeats < 1 or args.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")

    available = _implementations(device)
    wanted = args.impl or [name for name in _IMPLS if name in available]
    missing = [name for name in wanted if name not in available]
    results = []
    for n, h, v in shapes:
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        hidden = (torch.randn(n, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g)).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g)
        if args.ignore_fraction > 0:
            targets[torch.rand(n, generator=g) < args.ignore_fraction] = -100
        targets = targets.to(device)
        floor = (hidden.numel() + weight.numel()) * hidden.element_size()
        names = [name for name in wanted if name in available]
        rows = {name: dict(impl=name, n=n, h=h, v=v, dtype=str(dtype).replace("torch.", ""), floor_bytes=floor)
                for name in names}
        _measure_all({name: available[name] for name in names}, rows, hidden, weight, targets,
                     device=device, repeats=args.repeats, warmup=args.warmup)
        for name in names:
            results.append(rows[name])
            _print_row(rows[name])
    report = dict(device=device, device_name=_device_name(device), versions=_versions(),
                  threads=torch.get_num_threads(), command=" ".join(sys.argv),
                  missing_impls=missing, results=results,
                  memory_method=("torch.cuda.max_memory_allocated" if device == "cuda"
                                 else "LiveStorageTracker (TorchDispatchMode live tensor storage)"))
    if missing:
        print(f"not available here: {', '.join(missing)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


_header_printed = False


def _print_row(row: dict) -> None:
    global _header_printed
    if not _header_printed:
        print(f"{'impl':<14} {'N':>7} {'H':>6} {'V':>7} {'dtype':<9} {'peak extra MB':>13} "
              f"{'floor MB':>9} {'fwd+bwd ms':>11} {'loss':>9}")
        _header_printed = True
    head = f"{row['impl']:<14} {row['n']:>7} {row['h']:>6} {row['v']:>7} {row['dtype']:<9} "
    if "error" in row:
        print(head + f"error: {row['error']}")
        return
    print(head + f"{row['peak_extra_bytes'] / 2**20:>13.1f} {row['floor_bytes'] / 2**20:>9.1f} "
          f"{row['time_s'] * 1e3:>11.1f} {row['loss']:>9.4f}")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()
