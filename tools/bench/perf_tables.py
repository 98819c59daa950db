#!/usr/bin/env python
"""Writes the tables of docs/PERFORMANCE.md from the benchmarks' JSON, so no figure there
is copied by hand.

    python tools/bench/perf_tables.py                 # rewrite docs/PERFORMANCE.md in place
    python tools/bench/perf_tables.py --check         # fail if the file is not what the JSON gives

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers: `ops`
(tools/bench/bench_ops.py's docs/bench_ops.json), `goals` (the goals judged on that run),
`train` (tools/bench/train_speed.py's docs/results/train_speed.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PERFORMANCE.md"
OPS_JSON = ROOT / "docs" / "bench_ops.json"
TRAIN_JSON = ROOT / "docs" / "results" / "train_speed.json"


def _bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "tools" / "bench" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_ops", module)
    spec.loader.exec_module(module)
    return module


def _cpu(meta: dict) -> str:
    """The run's CPU for a table's header; nothing for a run that did not record it."""
    return f" {meta['cpu']}," if meta.get("cpu") else ""


def ops_table(data: dict) -> list[str]:
    comparators = ["eager", "compiled", "eager FFT", "compiled FFT", "F.conv groups=C"]
    lines = [
        f"{data['meta'].get('date', '?')}, commit {data['meta'].get('commit', '?')}, "
        f"torch {data['meta'].get('torch', '?')},{_cpu(data['meta'])} {data['meta'].get('threads')} "
        f"threads, medians of {data['meta'].get('repeats')} interleaved rounds; forward+backward, ms (ratio = "
        f"that time / ours); %copy: a same-size copy's time as a share of ours.",
        "",
        "| case | ours | eager | torch.compile | eager FFT | compiled FFT | F.conv groups=C | %copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        t = r["fwdbwd"]
        cells = []
        for name in comparators:
            v = t.get(name)
            cells.append(f"{v:.2f} ({v / t['ours']:.2f}×)" if v else "")
        copy = f"{100 * t['copy'] / t['ours']:.0f} %" if t.get("copy") else ""
        lines.append(f"| {r['name']} | {t['ours']:.2f} | " + " | ".join(cells) + f" | {copy} |")
    return lines


def goals_table(data: dict) -> list[str]:
    bench = _bench_ops()
    lines = ["| goal | verdict | measured (ratio, by case) |", "|---|---|---|"]
    for g in bench.evaluate_targets(bench.saved_results(data)):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[g["met"]]
        if g["threshold"] is None:
            over = [name for name, ours, eager in g["values"] if ours > eager]
            shown = f"{len(g['values'])} cases" + (f"; above eager: {', '.join(over)}" if over else "")
        else:
            shown = ", ".join(f"{label} {v:.2f}" for label, v in g["values"]) or "—"
        lines.append(f"| {g['target']} | {verdict} | {shown} |")
    return lines


def train_table(data: dict) -> list[str]:
    lines = [
        f"{data.get('date', '?')}, commit {data.get('commit', '?')}, torch {data.get('torch', '?')},{_cpu(data)} "
        f"{data['threads']} threads, {data['rounds']} rounds × {data['steps']} steps per path (medians; the "
        f"first step, torch.compile's compilation included, apart).",
        "",
        "| preset (batch) | path | train ms/step | samples/s | × reference | × reference+compile | eval ms | "
        "eval × reference | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(num: dict, den: dict, mode: str) -> str:
        return f"{num[mode] / den[mode]:.2f}" if num else ""

    for preset, paths in data["times"].items():
        med = {
            path: {m: statistics.median([t for r in v[m] for t in r]) for m in ("train", "eval")}
            for path, v in paths.items()
        }
        batch = data.get("batches", {}).get(preset, 1)
        ref, refc = med.get("reference", {}), med.get("reference+compile", {})
        for path, m in med.items():
            first = statistics.median(paths[path]["first_train_s"])
            cells = [
                f"{preset} ({batch})",
                path,
                f"{m['train'] * 1e3:.1f}",
                f"{batch / m['train']:.0f}",
                ratio(ref, m, "train"),
                ratio(refc, m, "train"),
                f"{m['eval'] * 1e3:.1f}",
                ratio(ref, m, "eval"),
                f"{first:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    for preset, failed in data.get("failures", {}).items():
        for path, why in failed.items():
            lines.append(f"| {preset} | {path} | failed: {why} | | | | | | |")
    return lines


def render(text: str) -> str:
    tables = {}
    if OPS_JSON.is_file():
        data = json.loads(OPS_JSON.read_text())
        tables["ops"], tables["goals"] = ops_table(data), goals_table(data)
    if TRAIN_JSON.is_file():
        tables["train"] = train_table(json.loads(TRAIN_JSON.read_text()))
    for name, lines in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.DOTALL)
        text = pattern.sub(lambda m, lines=lines: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if docs/PERFORMANCE.md differs from the JSON's tables")
    args = p.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(
                "docs/PERFORMANCE.md is not what the benchmarks' JSON gives: run tools/bench/perf_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
