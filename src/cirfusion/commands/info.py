"""`cirfusion info`: this machine as cirfusion sees it -- versions, CPU and its native reduced precisions, threads,
and the scoring path a fused model's ``score_dtype="auto"`` takes here (with the probe figures behind the choice)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from ..backbones.embedded import bf16_is_fast
from ..fusion.score_paths import MIN_TOP10_OVERLAP, PATHS, cache_file, choose_score_dtype, machine_key, native_dtypes
from ..manifest import code_version, environment


def collect(refresh: bool = False) -> dict[str, Any]:
    """Everything ``cirfusion info`` prints, as a dict (measures the scoring paths once if not cached)."""
    path = choose_score_dtype(refresh)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **code_version(), **environment(),
        "cpu": machine_key().split(" | ")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_reduced_precision": native_dtypes(), "bf16_autocast_native": bf16_is_fast(), "cores": cores,
        "fused_scoring": {"auto_choice": path.dtype, "probe_ms": path.probe_ms, "top10_overlap_vs_float32": path.overlap,
                          "min_overlap": MIN_TOP10_OVERLAP, "cache_file": str(cache_file()), "machine_key": path.machine},
    }


def format_info(info: dict[str, Any]) -> str:
    fs = info["fused_scoring"]
    lines = [
        f"cirfusion {info['cirfusion']}" + (f" ({info['git_commit'][:12]}{', dirty' if info['git_dirty'] else ''})"
                                           if info.get("git_commit") else ""),
        f"python {info['python']}, torch {info['torch']}, numpy {info['numpy']}",
        f"cpu: {info['cpu']} ({info['cores']} cores usable, torch capability {info['cpu_capability']}, "
        f"{info['num_threads']} torch threads)",
        "native reduced precision: " + (", ".join(info["native_reduced_precision"]) or "none"),
        f"embedded backbone's precision=auto here: {'bf16' if info['bf16_autocast_native'] else 'fp32'} (bf16 image "
        "features only where bf16 kernels are native)",
        f"fused models' score_dtype=auto here: {fs['auto_choice']} (the fastest path whose top-10 overlap with float32 "
        f"is >= {fs['min_overlap']} on the probe)",
    ]
    for p in PATHS:
        lines.append(f"  {p:9s} {fs['probe_ms'][p]:8.2f} ms per probe query, top-10 overlap {fs['top10_overlap_vs_float32'][p]:.3f}")
    lines.append(f"  (measured once per machine; cached in {fs['cache_file']}; `cirfusion info --refresh` measures again)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect(args.refresh)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("info", help="this machine: versions, CPU, threads and the fused scoring path auto picks",
                       description="Print versions, the CPU and its native reduced precisions, torch threads, and the "
                                   "scoring path (float32, bfloat16, float16 or int8) that fused models with "
                                   "score_dtype=auto use on this machine, with the probe timings and accuracy behind it.")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--refresh", action="store_true", help="measure the scoring paths again (else the cached figures)")
    p.set_defaults(func=run)
