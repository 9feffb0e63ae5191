"""The pass's output files, from whatever its steps recorded in the state folder (pure Python, no torch: it runs
after every step in a fraction of a second, so a command cut short still returns a current summary).

    python -m scripts.gpu_pass.summary --state /tmp/gpu_pass --out $OUT --command main [--png]

writes summary.md (what ran and what did not, pass/fail counts per backend x dtype, sanitizer results, the
headline against the goals, the per-conv table), bench.json (the steps' timings merged, pytest-benchmark format),
results.json (every record) and logs.tar.gz (every log and record); --png adds bench.png through
`resnet_fused report` (which imports torch). The goals are the README's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from .correctness import counts
from .steps import COMMAND_LIMITS, MAX_FILES, OUTPUTS, STEPS
from .train import TEST_FILES as TRAIN_TEST_FILES

RECORDS = ("env", "warmup", "correctness", "memcheck", "racecheck", "headline", "convs", "train", "compile")
BENCH_RECORDS = ("headline", "convs", "train", "compile")  # merged in this order: a later run's provider timing wins
SANITIZERS = {"memcheck": re.compile(r"ERROR SUMMARY: (\d+) error"),
              "racecheck": re.compile(r"RACECHECK SUMMARY: (\d+) hazard")}
STATUSES = ("pass", "fail", "error", "not run", "skipped")
MODEL_GROUP = "model resnet50 224x224 | bf16 b{batch} cuda"
TRAIN_GROUP = "train resnet50 224x224 train step | bf16 b256 cuda"  # benchmarks/test_bench_train.py's group
FUSED = ("triton", "cuda")

# The README's speed goals (resnet50 bf16, 224x224; per conv from the CUDA backend's Hopper issue).
GOAL_B256_VS_EAGER = 2.0
GOAL_VS_MAX_AUTOTUNE = 1.2
GOAL_PERCENT_OF_ROOFLINE = 50.0
GOAL_B1_VS_EAGER = 1.5
GOAL_CONV_GEOMEAN, GOAL_CONV_WORST, GOAL_CUDA_VS_TRITON = 1.3, 0.9, 1.2
GOAL_TRAIN_VS_EAGER = 1.3  # the train step (bf16 autocast, batch 256) against eager channels_last


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load(state: Path) -> dict:
    """Every record the steps left in `state` (absent ones are None)."""
    data = {name: _read_json(state / f"{name}.json") for name in RECORDS}
    steps_file = state / "steps.jsonl"
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    data["steps"] = [json.loads(line) for line in lines if line.strip()]
    data["sanitizer_logs"] = {}
    for tool, pattern in SANITIZERS.items():
        log = state / "logs" / f"{tool}.log"
        if log.is_file():
            found = pattern.findall(log.read_text(errors="replace"))
            data["sanitizer_logs"][tool] = int(found[-1]) if found else None
    data["benches"] = [doc for doc in (_read_json(state / f"{name}.bench.json") for name in BENCH_RECORDS) if doc]
    return data


def merged_bench(data: dict) -> Optional[dict]:
    from .benchjson import merge

    return merge(data["benches"]) if data["benches"] else None


def medians(bench: Optional[dict]) -> Dict[str, Dict[str, float]]:
    """group -> {provider: median seconds}."""
    groups: Dict[str, Dict[str, float]] = {}
    for b in (bench or {}).get("benchmarks", []):
        groups.setdefault(b["group"], {})[b["extra_info"]["provider"]] = b["stats"]["median"]
    return groups


# ---- sections ---------------------------------------------------------------------------------------------

def _missing(data: dict, step: str) -> str:
    """Why a step left no record: not run, or how it ended."""
    ran = [r for r in data["steps"] if r["step"] == step]
    if not ran:
        return "not run"
    r = ran[-1]
    if r["status"] == "skipped":
        return "not run: skipped, no time left"
    return (f"no record: the step ended ({r['status']}, exit {r['rc']}, {r['seconds']} s) before writing one; "
            f"see logs/{step}.log in logs.tar.gz")


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mark(met: Optional[bool]) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


def step_rows(data: dict, command: str) -> List[List[str]]:
    """| command | step | budget | timeout | took | status | for both commands."""
    recorded = {(r["command"], r["step"]): r for r in data["steps"]}
    commands_seen = {r["command"] for r in data["steps"]}
    rows = []
    for step in STEPS:
        r = recorded.get((step.command, step.name))
        if r is None:
            status = "not reached yet" if step.command == command else (
                "not run" if step.command not in commands_seen else "not reached")
            rows.append([step.command, step.name, str(step.budget_s), "", "", status])
            continue
        status = {"ok": "ok", "skipped": "skipped: no time left", "timeout": f"TIMEOUT (cut at {r['timeout']} s)",
                  "failed": f"FAILED (exit {r['rc']})"}.get(r["status"], r["status"])
        rows.append([step.command, step.name + (" (parallel)" if step.parallel_with else ""), str(step.budget_s),
                     str(r["timeout"]), str(r["seconds"]), status])
    return rows


def config_coverage(record: Optional[dict]) -> Dict[tuple, int]:
    """(dtype, Triton config) -> distinct shapes on which that forced config passed."""
    shapes: Dict[tuple, set] = {}
    for entry in (record or {}).get("cases", []):
        match = re.search(r"cfg=(\S+)", entry["id"])
        if entry["backend"] == "triton" and match and entry["status"] == "pass":
            shapes.setdefault((entry["dtype"], match.group(1)), set()).add(" ".join(entry["id"].split()[:2]))
    return {key: len(names) for key, names in shapes.items()}


def correctness_section(data: dict) -> List[str]:
    record = data["correctness"]
    lines = ["## Correctness against the fp32 oracle", ""]
    if not record:
        return lines + [_missing(data, "correctness"), ""]
    lines += [f"{len(record['cases'])} cases in {record.get('seconds', 0)} s"
              + ("" if record.get("finished") else f"; cut short: {len(record.get('not_run', []))} not run"), ""]
    for backend, info in record["backends"].items():
        if not info["available"]:
            lines.append(f"- `{backend}` unavailable: {info['reason']}")
    lines += ["", "| backend | dtype | " + " | ".join(STATUSES) + " |", "|" + " --- |" * (2 + len(STATUSES))]
    for (backend, dtype), cell in sorted(counts(record).items()):
        lines.append(f"| {backend} | {dtype} | " + " | ".join(str(cell.get(s, 0)) for s in STATUSES) + " |")
    coverage = config_coverage(record)
    if coverage:
        fewest = min(coverage.values())
        lines += ["", f"Triton autotune configs forced: {len({c for _, c in coverage})} configs x "
                      f"{len({d for d, _ in coverage})} dtypes; each passed on at least {fewest} shapes."]
    bad = [e for e in record["cases"] if e["status"] in ("fail", "error")]
    if bad:
        lines += ["", f"Failures ({len(bad)}; first 40):", ""]
        lines += [f"- {e['status']}: {e['backend']} `{e['id']}`: {e.get('message', '')}" for e in bad[:40]]
    return lines + [""]


def sanitizer_section(data: dict) -> List[str]:
    lines = ["## compute-sanitizer (PYTORCH_NO_CUDA_MEMORY_CACHING=1)", ""]
    for tool in SANITIZERS:
        record, found = data[tool], data["sanitizer_logs"].get(tool)
        if record is None and found is None:
            lines.append(f"- {tool}: {_missing(data, tool)}")
            continue
        what = "errors" if tool == "memcheck" else "hazards"
        verdict = f"{found} {what} reported" if found is not None else "no summary line in its log (cut short?)"
        cases = ""
        if record:
            counts = {}
            for e in record["cases"]:
                counts[e["status"]] = counts.get(e["status"], 0) + 1
            cases = f"; {len(record['cases'])} launches checked ({', '.join(f'{n} {s}' for s, n in counts.items())})"
            if record.get("not_run"):
                cases += f", {len(record['not_run'])} not reached"
        lines.append(f"- {tool}: {verdict}{cases}")
    return lines + [""]


def _setting(data: dict, batch: int) -> dict:
    """The providers' records at `batch`, from the main run and the follow-up (a later one wins)."""
    merged: dict = {}
    for name in ("headline", "compile"):
        setting = ((data[name] or {}).get("settings") or {}).get(f"b{batch}") or {}
        for provider, info in setting.get("providers", {}).items():
            merged[provider] = dict(info, roofline_bound_s=setting.get("roofline_bound_s"))
    return merged


def headline_section(data: dict, groups: Dict[str, Dict[str, float]]) -> List[str]:
    lines = ["## Headline: resnet50 bf16, 224x224", ""]
    for batch in (256, 1):
        timings, infos = groups.get(MODEL_GROUP.format(batch=batch), {}), _setting(data, batch)
        if not infos:
            lines += [f"batch {batch}: {_missing(data, 'headline')}", ""]
            continue
        eager, cudnn = timings.get("eager"), timings.get("cudnn")
        lines += [f"### batch {batch}", "",
                  "| provider | ms | images/s | vs eager | vs cudnn | % of roofline | check |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for provider, info in infos.items():
            median = timings.get(provider)
            if median is None:
                lines.append(f"| {provider} | - | - | - | - | - | {info.get('status', '?')}: "
                             f"{info.get('message', 'not timed')} |")
                continue
            bound = info.get("roofline_bound_s")
            cells = [provider, f"{median * 1e3:.2f}", f"{batch / median:.0f}",
                     _fmt_ratio(eager / median if eager else None), _fmt_ratio(cudnn / median if cudnn else None),
                     f"{100 * bound / median:.0f}%" if bound else "-",
                     f"{info.get('status')} (rel err {info.get('rel_err', float('nan')):.1e})"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for name in ("headline", "compile"):
        for note in (data[name] or {}).get("notes", []):
            lines.append(f"- {name}: {note}")
    return lines + [""]


def train_section(data: dict, groups: Dict[str, Dict[str, float]]) -> List[str]:
    """The training path: the BatchNorm kernels' GPU tests, the train step against eager and its goal."""
    lines = ["## Training: BatchNorm kernels and the resnet50 train step (bf16 autocast, batch 256, 224x224)", ""]
    record = data["train"]
    if not record:
        return lines + [_missing(data, "train"), ""]
    tests = record.get("tests", {})
    lines.append(f"- BatchNorm kernels' GPU tests ({', '.join(TRAIN_TEST_FILES)}): {tests.get('passed', 0)} passed, "
                 f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} "
                 f"skipped (pytest rc {tests.get('rc')}, {tests.get('seconds')} s)")
    lines += [f"  - FAILED `{test_id}`" for test_id in tests.get("failures", [])[:20]]
    timings = groups.get(TRAIN_GROUP, {})
    eager = timings.get("eager")
    if not timings:
        bench = record.get("bench", {})
        why = f"pytest rc {bench.get('rc')}" + (f": {bench['reason']}" if "reason" in bench else "")
        lines.append(f"- train step: not timed ({why})")
        return lines + [""]
    lines += ["", f"| provider | ms per step | vs eager (goal {GOAL_TRAIN_VS_EAGER}x) |", "| --- | --- | --- |"]
    for provider, median in timings.items():
        ratio = eager / median if eager else None
        met = None if ratio is None or provider not in FUSED else ratio >= GOAL_TRAIN_VS_EAGER
        verdict = "" if met is None else f" ({_mark(met)})"
        lines.append(f"| {provider} | {median * 1e3:.1f} | {_fmt_ratio(ratio)}{verdict} |")
    return lines + [""]


def goals(data: dict, groups: Dict[str, Dict[str, float]], convs: Optional[dict]) -> List[List[str]]:
    """[goal, triton, cuda] rows: each fused backend's figure and whether it meets the goal."""
    b256, b1 = groups.get(MODEL_GROUP.format(batch=256), {}), groups.get(MODEL_GROUP.format(batch=1), {})
    infos = _setting(data, 256)
    rows = []

    def cell(value: Optional[float], met: Optional[bool], fmt="{:.2f}x") -> str:
        return "not measured" if value is None else f"{fmt.format(value)} ({_mark(met)})"

    def ratio(table, num, den):
        return table[num] / table[den] if num in table and den in table else None

    row = [f"batch 256: >= {GOAL_B256_VS_EAGER}x eager"]
    for b in FUSED:
        value = ratio(b256, "eager", b)
        row.append(cell(value, None if value is None else value >= GOAL_B256_VS_EAGER))
    rows.append(row)
    row = [f"batch 256: >= {GOAL_VS_MAX_AUTOTUNE}x torch.compile max-autotune"]
    for b in FUSED:
        value = ratio(b256, "torch.compile-max-autotune", b)
        row.append(cell(value, None if value is None else value >= GOAL_VS_MAX_AUTOTUNE)
                   + (f"; vs torch.compile default {ratio(b256, 'torch.compile', b):.2f}x"
                      if ratio(b256, "torch.compile", b) else ""))
    rows.append(row)
    row = [f"batch 256: >= {GOAL_PERCENT_OF_ROOFLINE:.0f}% of the roofline bound"]
    for b in FUSED:
        bound = infos.get(b, {}).get("roofline_bound_s")
        value = 100 * bound / b256[b] if bound and b in b256 else None
        row.append(cell(value, None if value is None else value >= GOAL_PERCENT_OF_ROOFLINE, "{:.0f}%"))
    rows.append(row)
    row = [f"batch 1, CUDA graphs: >= {GOAL_B1_VS_EAGER}x eager"]
    for b in FUSED:
        value = ratio(b1, "eager", b + "+cudagraph")
        graphs = ratio(b1, "eager+cudagraph", b + "+cudagraph")
        row.append(cell(value, None if value is None else value >= GOAL_B1_VS_EAGER)
                   + (f"; vs eager+cudagraph {graphs:.2f}x" if graphs else ""))
    rows.append(row)
    speedups = conv_speedups(convs)
    row = [f"per conv, batch 256: geomean >= {GOAL_CONV_GEOMEAN}x eager, none < {GOAL_CONV_WORST}x"]
    for b in FUSED:
        s = speedups.get(b)
        row.append("not measured" if not s else
                   f"{_geomean(s):.2f}x, worst {min(s):.2f}x "
                   f"({_mark(_geomean(s) >= GOAL_CONV_GEOMEAN and min(s) >= GOAL_CONV_WORST)})")
    rows.append(row)
    vs_triton = conv_time_ratios(convs, "cuda", "triton")
    rows.append([f"per conv: cuda within {GOAL_CUDA_VS_TRITON}x of triton's time", "-",
                 "not measured" if not vs_triton else
                 f"geomean {_geomean(vs_triton):.2f}x, worst {max(vs_triton):.2f}x "
                 f"({_mark(_geomean(vs_triton) <= GOAL_CUDA_VS_TRITON)})"])
    return rows


def _geomean(values: List[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def conv_speedups(convs: Optional[dict]) -> Dict[str, List[float]]:
    """provider -> [eager time / its time] over the layers where both were timed."""
    out: Dict[str, List[float]] = {}
    for row in (convs or {}).get("layers", []):
        eager = row["providers"].get("eager", {}).get("median_s")
        for provider, info in row["providers"].items():
            if eager and info.get("median_s") and provider != "eager":
                out.setdefault(provider, []).append(eager / info["median_s"])
    return out


def conv_time_ratios(convs: Optional[dict], a: str, b: str) -> List[float]:
    ratios = []
    for row in (convs or {}).get("layers", []):
        ta, tb = (row["providers"].get(p, {}).get("median_s") for p in (a, b))
        if ta and tb:
            ratios.append(ta / tb)
    return ratios


def convs_section(data: dict) -> List[str]:
    convs = data["convs"]
    lines = ["## Per conv: bf16 batch 256 (ms, and percent of the layer's roofline bound)", ""]
    if not convs:
        return lines + [_missing(data, "convs"), ""]
    providers = ("eager", "cudnn", "triton", "cuda")
    lines += ["| layer | x | " + " | ".join(providers) + " | triton vs eager | cuda vs eager |",
              "|" + " --- |" * (4 + len(providers))]
    for row in convs["layers"]:
        cells, p = [], row["providers"]
        for provider in providers:
            info = p.get(provider, {})
            cells.append(f"{info['median_s'] * 1e3:.3f} ({info['percent_of_roofline']:.0f}%)" if "median_s" in info
                         else info.get("status", "-"))
        eager = p.get("eager", {}).get("median_s")
        ratios = [_fmt_ratio(eager / p[b]["median_s"]) if eager and "median_s" in p.get(b, {}) else "-"
                  for b in FUSED]
        lines.append(f"| {row['layer']} | {row['count']} | " + " | ".join(cells + ratios) + " |")
    if convs.get("unavailable"):
        lines += [""] + [f"- {p} unavailable: {why}" for p, why in convs["unavailable"].items()]
    if convs.get("note"):
        lines += ["", f"- {convs['note']}"]
    return lines + [""]


def machine_section(env: dict) -> List[str]:
    if not env:
        return []
    lines = [f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}; compute capability {env.get('capability')}, {env.get('sm_count')} SMs, "
             f"{env.get('memory_gib')} GiB; driver, clocks, temperature, power: {env.get('driver')}; "
             f"{env.get('cpu_count')} CPU cores", "",
             f"nvcc: {env.get('nvcc')}; compute-sanitizer: {env.get('compute_sanitizer')}", ""]
    wheels = env.get("wheels_installed") or []
    if any(w.startswith("nvidia_cutlass") for w in wheels):
        return lines + [f"Carried wheels installed: {', '.join(wheels)}", ""]
    carried = f" (carried: {', '.join(wheels)})" if wheels else ""
    return lines + ["**No nvidia-cutlass wheel was carried (.whl/nvidia_cutlass-*.whl)**: the cuda backend was built "
                    f"without CUTLASS headers{carried}.", ""]


def warmup_line(warmup: Optional[dict]) -> List[str]:
    if not warmup:
        return []
    ended = "" if warmup.get("finished") else " (cut short" + (f": {warmup['broken']}" if warmup.get("broken")
                                                                else "") + ")"
    return ["", f"Triton warm-up: {len(warmup['done'])} of {warmup['jobs']} compiles in {warmup.get('seconds')} s on "
                f"{warmup['workers']} processes, {warmup.get('errors', 0)} errors{ended}."]


def glance(data: dict, groups: Dict[str, Dict[str, float]]) -> List[str]:
    """The few lines a person reads first: correctness totals, sanitizer verdicts, headline ratios, what broke."""
    lines = ["## At a glance", ""]
    totals: Dict[str, Counter] = {}
    for (backend, _), cell in counts(data["correctness"] or {"cases": []}).items():
        totals.setdefault(backend, Counter()).update(cell)
    lines.append("- correctness: " + ("; ".join(f"{b} " + ", ".join(f"{n} {st}" for st, n in sorted(c.items()))
                                                for b, c in totals.items()) or _missing(data, "correctness")))
    found = data["sanitizer_logs"]
    lines.append("- sanitizers: " + ", ".join(f"{tool} {'-' if found.get(tool) is None else found[tool]}"
                                             for tool in SANITIZERS) + " (errors / hazards reported)")
    for batch, base in ((256, ""), (1, "+cudagraph")):
        timings = groups.get(MODEL_GROUP.format(batch=batch), {})
        if "eager" in timings:
            ratios = [f"{b + base} {timings['eager'] / timings[b + base]:.2f}x" for b in FUSED if b + base in timings]
            lines.append(f"- resnet50 bf16 batch {batch} vs eager: " + (", ".join(ratios) or "no fused timing"))
    train = groups.get(TRAIN_GROUP, {})
    if "eager" in train:
        ratios = [f"{b} {train['eager'] / train[b]:.2f}x" for b in FUSED if b in train]
        lines.append("- resnet50 bf16 batch 256 train step vs eager: " + (", ".join(ratios) or "no fused timing"))
    broken = [f"{r['command']} {r['step']} {r['status']}" for r in data["steps"] if r["status"] != "ok"]
    lines.append("- steps not ok: " + (", ".join(broken) or "none"))
    return lines + [""]


def render(data: dict, command: str) -> str:
    env = data["env"] or {}
    groups = medians(merged_bench(data))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU pass on {env.get('device', 'an unrecorded device')} ({when})", "", *machine_section(env),
             *glance(data, groups), "## Steps", "", "| command | step | budget s | timeout s | took s | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in step_rows(data, command)]
    lines += [*warmup_line(data["warmup"]), "", *correctness_section(data), *sanitizer_section(data),
              *headline_section(data, groups), "### Against the goals (README)", "", "| goal | triton | cuda |",
              "| --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in goals(data, groups, data["convs"])]
    lines += ["", *convs_section(data), *train_section(data, groups)]
    return "\n".join(lines) + "\n"


def write_outputs(state: Path, out: Path, command: str) -> List[Path]:
    """summary.md, results.json, bench.json (when anything was timed), logs.tar.gz under `out`."""
    data = load(state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(render(data, command))
    (out / "results.json").write_text(json.dumps({k: v for k, v in data.items() if k != "benches"}, indent=1))
    bench = merged_bench(data)
    if bench:
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted([*state.glob("*.json"), *state.glob("*.jsonl"), *state.glob("logs/*.log")]):
            tar.add(path, arcname=str(path.relative_to(state)))
    return sorted(p for p in out.rglob("*") if p.is_file())


def write_png(out: Path) -> str:
    """bench.png through `python -m resnet_fused report` (its tables go to stdout); why not, if it cannot."""
    from resnet_fused.__main__ import main as resnet_fused_command

    if not (out / "bench.json").is_file():
        return "no bench.json: nothing was timed"
    try:
        resnet_fused_command(["report", str(out / "bench.json"), "--out", str(out / "bench.png"), "--markdown"])
    except SystemExit as exc:
        return str(exc)
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", choices=sorted(COMMAND_LIMITS), required=True)
    parser.add_argument("--png", action="store_true", help="also bench.png (imports torch)")
    args = parser.parse_args(argv)
    files = write_outputs(args.state, args.out, args.command)
    if args.png:
        why = write_png(args.out)
        if why:
            print(f"no bench.png: {why}")
        files = sorted(p for p in args.out.rglob("*") if p.is_file())
    unexpected = [p.name for p in files if p.name not in OUTPUTS]
    print(f"{len(files)} files in {args.out}: {', '.join(p.name for p in files)}")
    if len(files) > MAX_FILES or unexpected:
        print(f"at most {MAX_FILES} files come back, all named in steps.OUTPUTS; unexpected: {unexpected}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
