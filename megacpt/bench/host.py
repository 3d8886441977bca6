"""Facts about the machine a benchmark ran on. Light on purpose (no torch): benchmark child
processes import it, and their resident set is what some benchmarks measure."""

from __future__ import annotations

import platform


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
