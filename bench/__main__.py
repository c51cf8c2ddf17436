"""`python -m bench`: run every benchmark and write bench/RESULTS.md.

`python -m bench "PHASE" ...` runs only the named phases and replaces their sections in
RESULTS.md (each marked with when it ran alone), leaving the others from the last full run."""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import (
    batching,
    feedback,
    import_export,
    latency,
    memory,
    monitoring,
    predict_load,
    registry,
    request_path,
    rollout,
    worker_classes,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FAILED_RESULTS = Path(__file__).resolve().parent / ".work" / "RESULTS.failed.md"
NOTES = Path(__file__).resolve().parent / "NOTES.md"  # what changed because of the numbers, and the gaps


@dataclass(frozen=True)
class Phase:
    name: str
    measures: str
    minutes: int  # about, on a 2-core machine
    run: Callable[[], str]


PHASES = (
    Phase("predict under load", "/api/predict: full service, exact limits and bare app at batch 1 and 32, hot swaps, "
          "TorchServe, MLflow and KServe (installed under bench/.work on the first run: 10 more minutes)", 8,
          predict_load.run),
    Phase("latency at equal offered load", "open loop at 25%, 50% and 75% of the bare app's capacity, and at each "
          "server's own 50% (the service at each peer's too): the service, the bare app and every peer", 6, latency.run),
    Phase("dynamic batching", "a model whose forward pass dominates: the service and TorchServe, each without and "
          "with its own batching", 4, batching.run),
    Phase("worker classes", "the full service and the bare app under eventlet, gevent and gthread", 4,
          worker_classes.run),
    Phase("request path", "the WSGI app in one process, layer by layer", 1, request_path.run),
    Phase("monitoring", "recording cost, drift and statistics over 1k-100k records", 1, monitoring.run),
    Phase("registry", "save and verified load of 1 MB, 100 MB and 1 GB models against safetensors", 1, registry.run),
    Phase("import and export", "a 96 MB artifact in and out against hashing it", 1, import_export.run),
    Phase("rollouts", "throughput with a 10% canary and shadow; a canary decided under load", 2, rollout.run),
    Phase("labels and quality", "10,000-label calls, quality over 100,000 labels, predict while labels stream", 2,
          feedback.run),
    Phase("worker memory", "worker RSS of the service, the bare app and every peer after warm-up, 10k and 100k "
          "requests (the service and the bare app on to 300k)", 11, memory.run),
)


def main(names: list[str]) -> int:
    unknown = set(names) - {phase.name for phase in PHASES}
    if unknown:
        print(f"make bench: no phase named {', '.join(sorted(unknown))}; phases: {', '.join(p.name for p in PHASES)}")
        return 2
    phases = [phase for phase in PHASES if phase.name in names] if names else list(PHASES)
    results = _results_before_notes() if names else ""  # a partial run splices into these: check them first
    total = sum(phase.minutes for phase in phases)
    print(f"make bench: {len(phases)} phases, about {total} minutes on 2 cores", flush=True)
    sections, failed = [], []
    for number, phase in enumerate(phases, 1):
        print(f"[{number}/{len(phases)}] {phase.name}: {phase.measures} (about {phase.minutes} min)", flush=True)
        started, threads_before = time.monotonic(), set(threading.enumerate())
        try:
            section = phase.run()
            _no_threads_left(phase.name, threads_before)
            sections.append(section)
        except Exception as exc:
            traceback.print_exc()
            failed.append(phase.name)
            sections.append(f"## {phase.name}\n\nFailed in this run: {exc}\n")
        outcome = "FAILED" if phase.name in failed else "done"
        print(f"[{number}/{len(phases)}] {phase.name}: {outcome} in {time.monotonic() - started:.0f} s", flush=True)
    text = _with_sections(results, sections) if names else _full_results(sections)
    if failed:  # the committed results stay those of the last complete run
        FAILED_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        FAILED_RESULTS.write_text(text)
        print(f"make bench: {len(failed)} phase(s) failed: {', '.join(failed)}; this run's tables are in {FAILED_RESULTS}")
        return 1
    RESULTS.write_text(text)
    print(f"make bench: every phase done; results in {RESULTS}")
    return 0


def _full_results(sections: list[str]) -> str:
    header = (
        f"# Benchmark results\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · Python {platform.python_version()} · "
        f"torch {torch.__version__} · {platform.machine()} · {_cpu()} · {_host_speed()} · `make bench`\n\n"
        "Every number comes with a baseline measured in the same run; compare the ratios, not the absolute times "
        "(these machines are noisy).\n"
    )
    return header + "\n".join(sections) + "\n" + NOTES.read_text()


def _results_before_notes() -> str:
    """RESULTS.md's tables: the text before its copy of the notes (which start with NOTES.md's heading)."""
    heading = NOTES.read_text().partition("\n")[0]
    text = RESULTS.read_text()
    at = text.find(f"\n{heading}\n")
    if at < 0:
        raise SystemExit(f"make bench: {RESULTS} has no '{heading}' section; run every phase (make bench)")
    return text[:at + 1]


def _with_sections(results: str, sections: list[str]) -> str:
    """`results` (the tables) with each section, a phase run alone, in place of the one with
    its heading, or last when it has none yet, marked with when it ran; then the notes."""
    text, speed = results.rstrip("\n") + "\n", _host_speed()
    for section in sections:
        heading, _, body = section.partition("\n")
        replacement = (f"{heading}\n\n_Run alone: `python -m bench` with this phase, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
                       f"{speed}._\n{body}")
        start = text.find(f"\n{heading}\n")
        if start < 0:
            text += "\n" + replacement
            continue
        following = text.find("\n## ", start + 1 + len(heading))
        text = text[:start + 1] + replacement + (text[following:] if following >= 0 else "")
    return text + "\n" + NOTES.read_text()


def _no_threads_left(phase: str, threads_before: set[threading.Thread]) -> None:
    """A phase stops every thread it started before its temporary folders go (a thread left
    running would outlive the store it works on)."""
    left = [thread.name for thread in threading.enumerate() if thread not in threads_before]
    if left:
        raise RuntimeError(f"{phase} left threads running: {', '.join(left)}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({__import__('os').cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _host_speed() -> str:
    """How fast this host's core was at the end of the run, as one number that sections run at
    different times can be compared by: the same cloud machine type has measured twice as
    fast on one day as on another, which moves every absolute time of the run."""
    block = bytes(64 * 2**20)
    seconds = monitoring.best_of(5, lambda: hashlib.sha256(block).digest())
    return f"SHA-256 at {len(block) / seconds / 1e9:.2f} GB/s on one core"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
