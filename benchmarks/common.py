"""Shared helpers of the benchmarks: the machine they ran on, and writing result tables."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU model, cores, memory, GPU and library versions of this run."""
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, table: str, data: dict, notes: str = "") -> Path:
    """Write benchmarks/results/NAME.md (table, machine, notes) and NAME.json; return the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    machine_line = ", ".join(f"{k}: {v}" for k, v in info.items() if v is not None)
    md = f"# {title}\n\n{table}\n\nMachine: {machine_line}\n\n{notes}\n"
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, **data}, indent=2) + "\n")
    return RESULTS / f"{name}.md"
