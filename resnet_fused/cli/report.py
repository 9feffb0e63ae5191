"""`python -m resnet_fused report FILE.json [FILE.json ...] [--out PNG] [--cases PNG] [--markdown]`: pytest-benchmark
JSONs as speedup tables and plots. Several files (runs split across calls, e.g. torch.compile max-autotune timed
apart) merge into one table: a case's providers are gathered from every file, a later file's timing of the same
provider replacing an earlier one's.

Per benchmark group (one case: layer/block/model, dtype, batch, device), each provider's median time and
    speedup = median(eager) / median(provider)          (> 1: faster than eager)
and per kind (conv, block, model) and setting (dtype, batch, device), each provider's geometric-mean speedup
over the cases it ran, with its worst case. The provider comes from extra_info["provider"] (set by
benchmarks/), else params["provider"]; the kind and setting from the group name "<kind> <case> | <setting>".
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..ops.registry import backend_names
from .plotting import MISSING_MATPLOTLIB, bar_chart, have_matplotlib, panel_chart

BASELINE = "eager"
KIND_ORDER = ("model", "block", "conv")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="speedup tables and PNGs from a pytest-benchmark JSON")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="JSONs written by `pytest benchmarks --benchmark-json FILE` (several merge into one report)")
    p.add_argument("--out", type=png_path, default=None, help="summary PNG path (default: the first FILE with .png)")
    p.add_argument("--cases", type=png_path, default=None, help="also write a PNG with every case's speedups (tall)")
    p.add_argument("--markdown", action="store_true", help="print the summary as a markdown table too")
    p.set_defaults(run=run)


def png_path(text: str) -> Path:
    """argparse type of --out/--cases: matplotlib would write "plot.png" for "plot" (and report "plot"), and reject
    other suffixes only after the work."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must be a file name ending in .png, got {text!r}")
    return Path(text)


# Medians outside this range (seconds) are no timing: at 1e308 the milliseconds printed were inf.
PLAUSIBLE_SECONDS = (1e-12, 1e6)


def _read_json(path: Path):
    if not path.is_file():
        raise SystemExit(f"report: {path} is a directory, not a file" if path.is_dir() else
                         f"report: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"report: cannot read {path} ({exc.strerror or exc})")
    except RecursionError:
        raise SystemExit(f"report: {path} is nested too deeply to be a pytest-benchmark JSON") from None
    except ValueError as exc:
        raise SystemExit(f"report: {path} is not JSON ({exc})")


def load_groups(path) -> "OrderedDict[str, dict[str, float]]":
    """group -> {provider: median seconds}, in file order."""
    return _load(Path(path))[0]


def _load(path: Path):
    """(load_groups' answer, the machine the file was timed on or None)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SystemExit(f"report: {path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    groups: "OrderedDict[str, dict[str, float]]" = OrderedDict()
    for i, bench in enumerate(data["benchmarks"]):
        # Foreign or hand-edited JSON: every field is checked, so that it fails here in one line, not in a
        # traceback from the arithmetic below (a zero median divides by zero, a negative one has no log).
        if not isinstance(bench, dict):
            raise SystemExit(f"report: {path}: benchmarks[{i}] is not a benchmark object ({type(bench).__name__})")
        extra, params = _object(bench.get("extra_info")), _object(bench.get("params"))
        provider = str(extra.get("provider") or params.get("provider") or bench.get("name", "?"))
        group = str(bench.get("group") or bench.get("name", "?"))
        median = _object(bench.get("stats")).get("median")
        if median is None:
            continue
        low, high = PLAUSIBLE_SECONDS
        if isinstance(median, bool) or not isinstance(median, (int, float)) or not low <= median <= high:
            raise SystemExit(f"report: {path}: benchmarks[{i}] ({group}, {provider}) has median {median!r}; "
                             f"expected a time in seconds > 0, between {low:g} and {high:g}")
        groups.setdefault(group, {})[provider] = float(median)
    if not groups:
        raise SystemExit(f"report: {path} holds no benchmark with timing stats "
                         f"(was it run with --benchmark-disable?)")
    return groups, _machine(data)


def _machine(data: dict) -> Optional[str]:
    """What a run was timed on: the CPU (pytest-benchmark's machine_info: brand, cores) and the GPU of its CUDA
    cases (the benchmarks record the device's name with each); None when the file does not say."""
    cpu = _object(_object(data.get("machine_info")).get("cpu"))
    parts = [f"{cpu['brand_raw']}, {cpu.get('count', '?')} cores"] if cpu.get("brand_raw") else []
    parts += sorted({str(_object(bench.get("extra_info")).get("device_name")) for bench in data["benchmarks"]
                     if isinstance(bench, dict) and split_group(str(bench.get("group")))[2].endswith("cuda")})
    return "; ".join(parts) or None


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def load_all(paths) -> "Tuple[OrderedDict[str, dict[str, float]], Optional[str]]":
    """(load_groups of each file, merged: groups in first-seen order, later files' providers added or replacing;
    the machine they were timed on). Files from different machines are refused: they do not compare."""
    merged: "OrderedDict[str, dict[str, float]]" = OrderedDict()
    machines = {}
    for path in map(Path, paths):
        groups, machine = _load(path)
        machines.setdefault(machine, path)
        for group, providers in groups.items():
            merged.setdefault(group, {}).update(providers)
    known = {machine: path for machine, path in machines.items() if machine is not None}
    if len(known) > 1:
        ran = "; ".join(f"{path.name} on {machine}" for machine, path in known.items())
        raise SystemExit(f"report: these files were timed on different machines ({ran}): their timings do not "
                         f"merge into one table; report each machine's files on their own")
    return merged, next(iter(known), None)


def split_group(group: str) -> Tuple[str, str, str]:
    """(kind, case, setting) of a group named "<kind> <case> | <setting>" (the benchmarks' naming)."""
    head, _, setting = group.partition(" | ")
    kind, _, case = head.partition(" ")
    return kind, case or head, setting


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


class Summary(NamedTuple):
    """Geomean and worst speedup vs eager of one provider over one (kind, setting)'s cases."""

    geomean: float
    worst: float
    cases: int


def summarize(groups) -> "OrderedDict[Tuple[str, str], Dict[str, Summary]]":
    """(kind, setting) -> {provider: Summary}, kinds in KIND_ORDER, settings in file order."""
    speedups: Dict[Tuple[str, str], Dict[str, List[float]]] = OrderedDict()
    for group, providers in groups.items():
        base = providers.get(BASELINE)
        if not base:
            continue
        kind, _, setting = split_group(group)
        row = speedups.setdefault((kind, setting), {})
        for provider, median in providers.items():
            row.setdefault(provider, []).append(base / median)
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    ordered = sorted(speedups.items(), key=lambda kv: rank.get(kv[0][0], len(rank)))
    return OrderedDict((key, {p: Summary(math.exp(sum(map(math.log, v)) / len(v)), min(v), len(v))
                              for p, v in row.items()}) for key, row in ordered)


def summary_providers(summary) -> List[str]:
    names = {p for row in summary.values() for p in row}
    return [BASELINE] * (BASELINE in names) + sorted(names - {BASELINE})


def format_summary(summary, markdown: bool = False) -> str:
    providers = [p for p in summary_providers(summary) if p != BASELINE]
    cell = lambda s: f"{s.geomean:.2f}x ({s.worst:.2f}x)" if s else "-"  # noqa: E731
    rows = [[kind, setting, str(max(s.cases for s in row.values()))] + [cell(row.get(p)) for p in providers]
            for (kind, setting), row in summary.items()]
    header = ["kind", "setting", "cases"] + providers
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def speedup_series(groups):
    """(group labels, {provider: [speedup per group, NaN where absent]}) for groups that have an eager run."""
    labels = [g for g, p in groups.items() if BASELINE in p]
    providers = sorted({name for g in labels for name in groups[g] if name != BASELINE})
    series = {name: [groups[g][BASELINE] / groups[g][name] if name in groups[g] else float("nan")
                     for g in labels] for name in providers}
    return labels, series


def summary_panels(groups, summary):
    """One panel per kind: models case by case, convs and blocks as geomeans per setting."""
    panels = []
    for kind in dict.fromkeys(k for k, _ in summary):
        if kind == "model":
            names = [g for g in groups if split_group(g)[0] == "model" and BASELINE in groups[g]]
            labels, series = speedup_series(OrderedDict((g, groups[g]) for g in names))
            labels = [f"{split_group(g)[1]} | {split_group(g)[2]}" for g in labels]
            panels.append(("whole models: speedup vs eager", labels, series))
            continue
        keys = [key for key in summary if key[0] == kind]
        providers = [p for p in summary_providers({k: summary[k] for k in keys}) if p != BASELINE]
        series = {p: [summary[k][p].geomean if p in summary[k] else float("nan") for k in keys] for p in providers}
        cases = max(s.cases for k in keys for s in summary[k].values())
        panels.append((f"{kind}s: geomean speedup vs eager over {cases} cases", [k[1] for k in keys], series))
    return panels


# Providers as a chart's reader would name them (the benchmarks' short names stay in the tables).
PROVIDER_LABELS = {"eager": "eager PyTorch, channels_last", "eager-nchw": "eager PyTorch, NCHW",
                   "torch.compile": "torch.compile", "torch.compile-max-autotune": "torch.compile max-autotune",
                   "cudnn": "cuDNN fused conv+add+ReLU"}
GRAPHED = "+cudagraph"  # the benchmarks' suffix for a provider replayed as a CUDA graph
XLABEL = f"speedup vs {PROVIDER_LABELS[BASELINE]} (x)"


def provider_label(provider: str) -> str:
    base = provider[:-len(GRAPHED)] if provider.endswith(GRAPHED) else provider
    label = f"fused, {base} backend" if base in backend_names() else PROVIDER_LABELS.get(base, base)
    return label + (" + CUDA graph" if base != provider else "")


def _labelled(series: Dict[str, List[float]]) -> Dict[str, List[float]]:
    return {provider_label(name): values for name, values in series.items()}


def run(args) -> int:
    groups, machine = load_all(args.files)
    title = ", ".join(Path(f).name for f in args.files) + (f" ({machine})" if machine else "")
    print(format_table(groups))
    summary = summarize(groups)
    if not any(len(row) > 1 for row in summary.values()):
        # Nothing to compare: the files' providers never meet the eager baseline in one group.
        providers = sorted({p for row in groups.values() for p in row})
        raise SystemExit(f"report: no benchmark group has both an {BASELINE!r} run and another provider, so there "
                         f"is no speedup to report (providers found: {', '.join(providers)})")
    print("\nSummary: geomean speedup vs eager over each kind's cases (worst case in brackets)\n")
    print(format_summary(summary))
    if args.markdown:
        print("\n" + format_summary(summary, markdown=True))
    if not have_matplotlib():
        print("\n" + MISSING_MATPLOTLIB)
        return 0
    out = args.out or Path(args.files[0]).with_suffix(".png")
    panels = [(name, labels, _labelled(series)) for name, labels, series in summary_panels(groups, summary)]
    _write_png(out, panel_chart, panels, title=title, xlabel=XLABEL)
    if args.cases:
        labels, series = speedup_series(groups)
        _write_png(args.cases, bar_chart, labels, _labelled(series), title=f"every case: {title}", xlabel=XLABEL)
    return 0


def _write_png(path: Path, chart, *args, **kwargs) -> None:
    try:
        chart(path, *args, **kwargs)
    except OSError as exc:  # a missing folder, a directory, no permission
        raise SystemExit(f"report: cannot write {path} ({exc.strerror or exc})") from None
    print(f"\nwrote {path}")
