"""`python -m bench`: run every benchmark and write bench/RESULTS.md."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import import_export, monitoring, predict_load, registry, request_path, rollout

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = Path(__file__).resolve().parent / "NOTES.md"  # what changed because of the numbers, and the gaps


def main() -> int:
    sections = [predict_load.run(), request_path.run(), monitoring.run(), registry.run(), import_export.run(),
                rollout.run()]
    header = (
        f"# Benchmark results\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · Python {platform.python_version()} · "
        f"torch {torch.__version__} · {platform.machine()} · {_cpu()} · `make bench`\n\n"
        "Every number comes with a baseline measured in the same run; compare the ratios, not the absolute times "
        "(these machines are noisy).\n"
    )
    text = header + "\n".join(sections) + "\n" + NOTES.read_text()
    RESULTS.write_text(text)
    print(text)
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({__import__('os').cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
