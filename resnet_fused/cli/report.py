"""`python -m resnet_fused report FILE.json [--out PNG]`: a pytest-benchmark JSON as a speedup table and plot.

Per benchmark group (one case: layer/block/model, dtype, batch, device), each provider's median time and
    speedup = median(eager) / median(provider)          (> 1: faster than eager)
The provider comes from extra_info["provider"] (set by benchmarks/), else params["provider"].
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from .plotting import MISSING_MATPLOTLIB, bar_chart, have_matplotlib

BASELINE = "eager"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="speedup table and PNG from a pytest-benchmark JSON")
    p.add_argument("file", help="the JSON written by `pytest benchmarks --benchmark-json FILE`")
    p.add_argument("--out", default=None, help="PNG path (default: FILE with .png)")
    p.set_defaults(run=run)


def load_groups(path) -> "OrderedDict[str, dict[str, float]]":
    """group -> {provider: median seconds}, in file order."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"report: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"report: {path} is not JSON ({exc})")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SystemExit(f"report: {path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    groups: "OrderedDict[str, dict[str, float]]" = OrderedDict()
    for bench in data["benchmarks"]:
        extra, params = bench.get("extra_info") or {}, bench.get("params") or {}
        provider = extra.get("provider") or params.get("provider") or bench.get("name", "?")
        group = bench.get("group") or bench.get("name", "?")
        median = (bench.get("stats") or {}).get("median")
        if median is None:
            continue
        groups.setdefault(group, {})[provider] = float(median)
    if not groups:
        raise SystemExit(f"report: {path} holds no benchmark with timing stats "
                         f"(was it run with --benchmark-disable?)")
    return groups


def format_table(groups) -> str:
    lines = []
    for group, providers in groups.items():
        base = providers.get(BASELINE)
        lines.append(f"\n{group}")
        lines.append(f"  {'provider':<24} {'median ms':>10} {'vs eager':>9}")
        for provider, median in sorted(providers.items(), key=lambda kv: kv[1]):
            speedup = f"{base / median:>8.2f}x" if base else f"{'n/a':>9}"
            lines.append(f"  {provider:<24} {median * 1e3:>10.4f} {speedup}")
    return "\n".join(lines).lstrip("\n")


def speedup_series(groups):
    """(group labels, {provider: [speedup per group, NaN where absent]}) for groups that have an eager run."""
    labels = [g for g, p in groups.items() if BASELINE in p]
    providers = sorted({name for g in labels for name in groups[g] if name != BASELINE})
    series = {name: [groups[g][BASELINE] / groups[g][name] if name in groups[g] else float("nan")
                     for g in labels] for name in providers}
    return labels, series


def run(args) -> int:
    groups = load_groups(args.file)
    print(format_table(groups))
    labels, series = speedup_series(groups)
    if not labels or not series:
        print("\nno group has both an eager run and another provider: no plot")
        return 0
    if not have_matplotlib():
        print("\n" + MISSING_MATPLOTLIB)
        return 0
    out = Path(args.out) if args.out else Path(args.file).with_suffix(".png")
    bar_chart(out, labels, series, title=f"speedup vs eager: {Path(args.file).name}")
    print(f"\nwrote {out}")
    return 0
