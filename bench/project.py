"""`make project`: will N devices pay off? Projected speedup per strategy and N, from measurements on this machine.

    python -m bench.project [--model all|mlp,cnn] [--hardware this-machine|t4-pcie|FILE] [--devices 1,2,4,8]
                            [--nodes 1] [--batch_size B] [--scaling strong|weak|both] [--validate]
                            [--validate_rounds 2] [--out FILE]

1. Profile (cached; bench/profile_record.py): each script runs one process through `accelerate launch` with
   --profile_out (shared/profiling.py), and bench/collectives.py times gloo collectives on 2 processes (4 only
   where there are 4 cores). Both go into one profile record, runs/profiles/profile-<host>.json; later
   projections reuse it unless --reprofile or the scripts' settings changed.
2. Project (instant): shared/projection.py per model, strategy, N and scaling, on the hardware asked for.
3. --validate (bench/validation.py): per model of `make bench-strategies`, its real multi-process runs in
   --validate_rounds rounds, the model profiled and the small collectives timed before each round and after
   the last; the mean of the profiles and the pooled collectives (a shared host drifts; a measurement predicts
   the machine of its own minutes) predict each cell, compared with its measured step time (relative error;
   table printed and kept in the record's `validation`; cells whose runs did not finish are named, exit
   status 1).
The projection record (runs/projection-*.json) holds `predictions`, `validation` and where each input came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import launcher
from bench.profile_record import MODELS, UsageError, model_flags, own_scripts, profile_record, script_settings
from bench.validation import MEMORY_TOLERANCE, memory_rows, validate, validated
from shared import nccl_tests
from shared.collective_time import latency
from shared.projection import STRATEGIES, project
from shared.record import git_commit
from shared.verdicts import load_residuals, recommendation_lines, sentence, verdict_lines, with_range

REPO = launcher.REPO

PIPELINED = {"pipeline", "pipeline_1f1b", "hybrid"}


def load_hardware(name: str) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) else REPO / "hardware" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (REPO / "hardware").glob("*.yaml")))
        raise UsageError(f"--hardware {name}: no such hardware file; known: {known}, or a path to a .yaml")
    try:
        hw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: not readable YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(hw, dict):
        raise UsageError(f"{path}: a hardware file is a mapping of fields (see hardware/t4-pcie.yaml)")
    need = ["name", "kind"] + ([] if hw.get("kind") == "measured" else
                               ["peak_tflops", "memory_bandwidth_GBps", "launch_overhead_s", "links"])  # fmt: skip
    missing = [k for k in need if k not in hw]
    if missing:
        raise UsageError(f"{path}: missing {', '.join(missing)} (see hardware/t4-pcie.yaml for the fields)")
    peaks = hw.get("peak_tflops", {"fp32": 1})
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        raise UsageError(f"{path}: peak_tflops is a mapping of dtype to TFLOPS with at least fp32, e.g. "
                         "{fp32: 8.1, fp16: 65.0}")  # fmt: skip
    optional = ["matmul_efficiency", "memory_efficiency", "kernel_min_s", "host_link_GBps", "memory_gib"]
    numbers = (
        {k: hw[k] for k in [*need[2:], *optional] if k in hw and k != "links"}
        | {
            f"links.{name}.{k}": link.get(k)
            for name, link in hw.get("links", {}).items()
            for k in ("busbw_GBps", "latency_s", "half_bytes")
            if k in link or k != "half_bytes"
        }
        | {f"peak_tflops.{k}": v for k, v in peaks.items()}
    )
    numbers.pop("peak_tflops", None)
    bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
    if bad:  # YAML reads 8.1e12 as text: it wants 8.1e+12
        raise UsageError(f"{path}: {', '.join(bad)} must be non-negative numbers (write 8.1e+12, not 8.1e12)")
    if hw.get("kind") != "measured" and not peaks["fp32"]:
        raise UsageError(f"{path}: peak_tflops.fp32 must be above 0")
    return hw


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here (asked in a child: this process stays torch-free)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def latencies(collectives: dict) -> dict:
    """Per process count and op, the pooled latency of the latency-bound sizes, after compute and back to back
    (shared/collective_time.py `latency`), with its interval: what the projection prices a small message at."""
    return {
        n: {op: {"after_compute": latency(t), "back_to_back": latency(t.get("back_to_back", {}))}
            for op, t in ops.items()}
        for n, ops in collectives.items()
    }  # fmt: skip


def supported(profile: dict, strategy: str) -> bool:
    return not (strategy in PIPELINED and "pipeline" in profile.get("unsupported", []))


def predictions(rec: dict, hw: dict, models, devices, nodes, scalings, cores) -> list[dict]:
    rows, skipped = [], set()
    for name in models:
        prof = rec["models"][name]
        batch = prof["batch_size"]
        for scaling in scalings:
            for n in devices:
                k = max(nodes, hw.get("nodes", 1)) if n > 1 else 1
                k = max(k, -(-n // hw.get("devices_per_node", n)))
                if k > 1 and "inter" not in hw.get("links", {}):
                    skipped.add(
                        f"N = {n} needs {k} nodes and {hw['name']} has no inter-node link (links.inter)"
                    )
                    continue
                for strategy in ["single"] if n == 1 else STRATEGIES:
                    if not supported(prof, strategy) or (strategy == "hybrid" and (n < 4 or n % 2)) or n % k:
                        continue
                    if strategy in PIPELINED and (batch // (2 if strategy == "hybrid" else 1)) % 4:
                        continue
                    try:
                        p = project(prof, hw, strategy, n, nodes=k, batch=batch, scaling=scaling,
                                    cores=cores if hw.get("kind") == "measured" else None)  # fmt: skip
                    except ValueError as e:
                        raise UsageError(f"{name}: {e}") from None
                    rows.append({"model": name, "hardware": hw["name"], **p})
    for note in sorted(skipped):
        print(f"not projected: {note}")
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(cell(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def checked(args) -> tuple[list[str], list[int], dict, dict]:
    """(models, device counts, the hardware projected on, this machine's) from the arguments, each bad one a
    UsageError of one line before anything runs; `args.device` resolved."""
    models = MODELS if args.model == "all" else args.model.split(",")
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UsageError(
            f"--model {','.join(bad)}: unknown; known: all, {', '.join(MODELS)}, or --script PATH"
        )
    if args.batch_size < 0:
        raise UsageError("--batch_size must be positive")
    args.scripts = own_scripts(args.script, args.batch_size)
    if args.scripts:  # your scripts, and the built-in models only where --model names them
        models = [*(m for m in models if args.model != "all" and m not in args.scripts), *args.scripts]
    try:
        devices = sorted({int(d) for d in args.devices.split(",")})
    except ValueError:
        raise UsageError(f"--devices {args.devices}: not a comma-separated list of integers") from None
    if devices[0] < 1 or args.nodes < 1 or args.batch_size < 0 or args.validate_rounds < 1:
        raise UsageError("--devices, --nodes, --batch_size and --validate_rounds must be positive")
    script_settings(args.set)  # a malformed --set: one line before anything runs
    if args.validate_from and not list(Path(args.validate_from).glob("*.json")):
        raise UsageError(f"--validate_from {args.validate_from}: no run records there")
    hw = load_hardware(args.hardware)
    if args.collectives:
        try:
            hw["measured_collectives"] = nccl_tests.load(args.collectives.split(","))
        except nccl_tests.NcclTestsError as e:
            raise UsageError(str(e)) from None
        if hw.get("kind") == "measured":
            raise UsageError("--collectives describes a GPU cluster: give it with a GPU --hardware file")
        hw["collectives_files"] = args.collectives.split(",")
    local = load_hardware("this-machine")
    args.device = ("cuda" if cuda_available() else "cpu") if args.device == "auto" else args.device
    if args.device == "cuda" and args.validate:
        raise UsageError("--validate runs the CPU strategies of bench-strategies: use --device cpu")
    return models, devices, hw, local


def report(
    args,
    models: list[str],
    hw: dict,
    preds: list[dict],
    check: list[dict],
    yours: list[dict],
    missing: list[str],
) -> tuple[dict, dict | None]:
    """Print the verdicts first, the sentences, the table, what was priced as 0, and how the projection did
    against your runs and the validation; returns (verdicts per model, the validation summary)."""
    verdicts = {m: verdict_lines(m, hw["name"], [p for p in preds if p["model"] == m]) for m in models}
    print(
        "verdicts (range: where measured figures fell in validations of the same kind, shared/residuals.yaml):"
    )
    for name in models:
        print("\n".join(verdicts[name]))
    for name in models:
        mine = [p for p in preds if p["model"] == name and p["devices"] > 1]
        print(sentence(name, hw["name"], mine))
    print(table([{**p, "step_ms": p["step_s"] * 1e3} for p in preds if p["devices"] > 1],
                ["model", "strategy", "devices", "scaling", "global_batch", "step_ms", "speedup", "efficiency",
                 "memory_gib_per_device", "bottleneck", "verdict", "compute_source"]))  # fmt: skip
    assumed: dict[tuple, set] = {}  # (model, input priced as 0): the strategies whose predictions use it
    for p in preds + check:
        for what in p["assumed"]:
            assumed.setdefault((p["model"], what), set()).add(p["strategy"])
    for (model, what), strategies in sorted(assumed.items()):
        print(f"warning: {model}: {what} in the profile (its log under runs/profiles/ says why), priced as 0: "
              f"{', '.join(sorted(strategies))} predictions are lower bounds", file=sys.stderr)  # fmt: skip
    if yours:
        errs = sorted(yours, key=lambda c: abs(c["error"]))
        print(f"your runs in {args.runs_dir}: {len(errs)} cells of this machine, predicted from the profile with "
              f"mean |error| {statistics.mean(abs(c['error']) for c in errs):.1%}, worst {errs[-1]['error']:+.1%} "
              f"({errs[-1]['model']} {errs[-1]['strategy']} at N = {errs[-1]['devices']})")  # fmt: skip
    summary = {"cells": 0, "missing": missing} if missing else None
    if check:
        errs = [abs(c["error"]) for c in check]
        summary = {"cells": len(errs), "mean_abs_error": statistics.mean(errs), "max_abs_error": max(errs),
                   "missing": missing}  # fmt: skip
        print(table([{**c, "measured_ms": c["measured_step_s"] * 1e3, "predicted_ms": c["predicted_step_s"] * 1e3}
                     for c in check], ["model", "strategy", "devices", "global_batch", "measured_ms",
                                       "predicted_ms", "error", "oversubscribed"]))  # fmt: skip
        print(f"validation: mean |error| {summary['mean_abs_error']:.1%}, max {summary['max_abs_error']:.1%} "
              f"over {len(errs)} cells")  # fmt: skip
        if mem := memory_rows(check):
            print(f"memory per device, predicted vs measured above what the process held before the model "
                  f"(memory/train_gib; tolerance: {MEMORY_TOLERANCE['text']}):")  # fmt: skip
            print(table(mem, ["model", "strategy", "devices", "global_batch", "predicted_gib", "measured_gib",
                              "in_use_gib", "within"]))  # fmt: skip
    for name in models:  # the answer, last: what to do per N, and why
        print("\n".join(recommendation_lines(name, hw["name"], [p for p in preds if p["model"] == name])))
    return verdicts, summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", help="all, or a comma-separated list of " + ", ".join(MODELS))
    ap.add_argument("--script", default="",
                    help="your own script(s), comma-separated paths: profiled and projected like the built-in models")  # fmt: skip
    ap.add_argument("--hardware", default="this-machine", help="a name in hardware/ or a .yaml file")
    ap.add_argument("--devices", default="1,2,4,8", help="device counts, comma-separated")
    ap.add_argument("--nodes", type=int, default=1, help="spread the devices over this many nodes")
    ap.add_argument(
        "--batch_size", type=int, default=0, help="the model's batch (default: bench-strategies')"
    )
    ap.add_argument("--scaling", choices=["strong", "weak", "both"], default="both")
    ap.add_argument("--set", default="", help="script flags to profile with, e.g. image_size=224,freeze=true")
    ap.add_argument(
        "--validate", action="store_true", help="run bench-strategies now and compare (this machine)"
    )
    ap.add_argument("--validate_rounds", type=int, default=2, help="with --validate: launches per cell")
    ap.add_argument("--collectives", default="",
                    help="nccl-tests output file(s), comma-separated: your cluster's collectives at their rank count")  # fmt: skip
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the models are profiled: auto = the GPU where torch sees one, else one CPU core")  # fmt: skip
    ap.add_argument("--validate_from", default="", help="compare with the records in this folder instead")
    ap.add_argument(
        "--profile", default="", help="profile record to use (default runs/profiles/profile-<host>.json)"
    )
    ap.add_argument("--collective_max_mb", type=float, default=256, help="largest collective message timed")
    ap.add_argument("--reprofile", action="store_true", help="measure again even if a profile record matches")
    ap.add_argument("--data_dir", default=os.environ.get("DISTBENCH_DATA_DIR", "data"))
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--out", default="", help="projection record (default runs/projection-<time>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models, devices, hw, local = checked(args)
        residuals = load_residuals()
        t0 = time.perf_counter()
        later = tuple(validated(models)) if args.validate and not args.validate_from else ()
        flags = model_flags() | {name: s["flags"] for name, s in args.scripts.items()}
        profiles = profile_record(args, models, flags, later)
        rec = profiles.rec
        for h in (hw, local):
            if h.get("kind") == "measured":
                h["measured_collectives"] = rec["collectives"]
                h["collective_latency"] = latencies(rec["collectives"])
        check, missing, yours = [], [], []
        if args.validate or args.validate_from:
            check, missing = validate(args, rec, local, models, profiles)
        # the runs already in the folder: how far is the projection from them?
        elif Path(args.runs_dir).is_dir():
            yours, _ = validate(argparse.Namespace(**{**vars(args), "validate_from": args.runs_dir}), rec, local,
                                models, profiles)  # fmt: skip
        scalings = ["strong", "weak"] if args.scaling == "both" else [args.scaling]
        preds = [
            with_range(p, residuals)
            for p in predictions(rec, hw, models, devices, args.nodes, scalings, os.cpu_count())
        ]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: its processes stopped; the profile record keeps every model measured so far",
              file=sys.stderr)  # fmt: skip
        return 130
    verdicts, summary = report(args, models, hw, preds, check, yours, missing)
    out = Path(
        args.out or Path(args.runs_dir) / f"projection-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    record = {
        "kind": "distbench-projection",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "profile": {
            k: rec[k] for k in ("measured_at", "hostname", "machine", "git_commit", "threads_per_process")
        },
        "profile_models": {
            m: {
                "batch_size": rec["models"][m]["batch_size"],
                "flags": rec["models"][m]["flags"],
                "flops_per_step": rec["models"][m]["flops_per_step"],
            }
            for m in models
        },  # fmt: skip
        "sentences": {
            m: sentence(m, hw["name"], [p for p in preds if p["model"] == m and p["devices"] > 1])
            for m in models
        },  # fmt: skip
        "verdicts": verdicts,
        "residuals": residuals,
        "predictions": preds,
        "validation": check,
        "validation_summary": summary,
        "runs_folder_check": yours,  # the runs already in --runs_dir against the profile's predictions
        "git_commit": git_commit(),
        "project_s": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".part").write_text(json.dumps(record, indent=1))
    os.replace(out.with_suffix(".part"), out)
    print(f"projection record {out} ({record['project_s']:.0f} s)")
    if missing:  # a cell whose runs failed is not a cell that validated
        print(f"error: validation incomplete, not finished: {', '.join(missing)} (see the bench's logs)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
