"""A bench cell's result, its speedup over the baseline with an interval and flags, and the printed summary
(used by bench/batch.py, the batch bench/run.py runs)."""

from __future__ import annotations

import os

from shared import stats


def cell_result(cell: dict, setup: dict, rc: int, wall: float, before, after, rec: dict | None) -> dict:
    status = rec["status"] if rec else "no record"
    if rc and status == "finished":
        status = f"exit {rc}"
    steady = (rec or {}).get("timing", {}).get("steady") or {}
    key = (rec or {}).get("primary_metric", "test/loss")
    values = {**rec["history"][-1], **rec["test"]} if rec and rec["history"] else {}
    return {
        **{k: cell[k] for k in ("id", "model", "setup", "seed", "repeat", "tag")},
        "rc": rc,
        "wall_s": wall,
        "status": status,
        "run_id": rec["run_id"] if rec else None,
        "strategy": rec["setup"]["strategy"] if rec else None,
        "procs": setup["procs"],
        "devices": setup["devices"],
        "global_batch": rec["setup"]["global_batch_size"] if rec else None,
        "train_samples": (rec or {}).get("data", {}).get("used", {}).get("train"),
        "max_steps": (rec or {}).get("config", {}).get("max_steps"),
        "epochs": (rec or {}).get("config", {}).get("epochs"),
        "windows_step_s": steady.get("windows_step_s") or [],
        "steady": {k: v for k, v in steady.items() if k != "windows_step_s"},
        "load_before": before,
        "load_after": after,
        "metric": key,
        "value": values.get(key),
        "values": values,
    }


def comparable(a: dict, b: dict) -> bool:
    """Same work: global batch, train samples, epochs and step budget (same model and profile by construction)."""
    return all(a[k] == b[k] for k in ("global_batch", "train_samples", "epochs", "max_steps"))


def paired(a: list[dict], b: list[dict]) -> bool:
    """Window k of launch r timed the same steps on both sides: same seeds, launches and window counts."""

    def key(rows):
        return [(r["seed"], r["repeat"], r["steady"].get("steps"), len(r["windows_step_s"])) for r in rows]

    return key(a) == key(b)


def pooled_warmup(rows: list[dict]) -> bool:
    """Warm-up-dominated over all the cell's launches together: fewer steady steps than a bootstrap needs,
    or more warm-up time than steady time (each launch alone may be short: the launches are the repeats)."""
    steps = sum(r["steady"].get("steps", 0) for r in rows)
    warm = sum(r["steady"].get("warmup_s", 0.0) for r in rows)
    steady = sum(r["steady"].get("steady_s", 0.0) for r in rows)
    return steps < stats.MIN_STEADY_STEPS or warm > steady


def summarize_cell(rows: list[dict], base_rows: list[dict] | None, setup: dict) -> dict:
    """Pool the finished launches of one cell; compare with the pooled baseline (hierarchical bootstrap:
    launches, then windows within each)."""
    order = lambda r: (r["seed"], r["repeat"])  # noqa: E731
    ok = sorted((r for r in rows if r["status"] == "finished" and r["windows_step_s"]), key=order)
    out = {"launches": len(rows), "finished": len(ok), "run_ids": [r["run_id"] for r in rows if r["run_id"]]}
    if not ok:
        return out
    launches = [r["windows_step_s"] for r in ok]
    step, ci = stats.launches_median_ci(launches)
    batch = ok[0]["global_batch"]
    shares = [r["steady"].get("foreign_cpu_share") for r in ok] + [
        x for r in ok for x in (r["load_before"], r["load_after"])
    ]
    contended = any(s is not None and s > stats.CONTENDED_SHARE for s in shares)
    warm = pooled_warmup(ok)
    over = setup["procs"] > (os.cpu_count() or 1) and not setup["cuda"]
    out.update(
        windows=sum(map(len, launches)),
        steps=sum(r["steady"].get("steps", 0) for r in ok),
        step_s=step,
        step_s_ci95=ci,
        launch_step_s=stats.launch_medians(launches),
        samples_per_s=batch / step,
        samples_per_s_ci95=[batch / ci[1], batch / ci[0]],
        warmup_s=stats.median([r["steady"].get("warmup_s", 0.0) for r in ok]),
        foreign_cpu_share=max((s for s in shares if s is not None), default=None),
    )
    base_ok = sorted(
        (r for r in base_rows or [] if r["status"] == "finished" and r["windows_step_s"]), key=order
    )
    if base_ok and all(comparable(r, base_ok[0]) for r in ok):
        base_cont = any(
            s is not None and s > stats.CONTENDED_SHARE
            for r in base_ok
            for s in (r["steady"].get("foreign_cpu_share"), r["load_before"], r["load_after"])
        )
        out.update(
            stats.comparison(
                [r["windows_step_s"] for r in base_ok],
                launches,
                setup["devices"],
                contended=contended or base_cont,
                warmup_dominated=warm or pooled_warmup(base_ok),
                oversubscribed=over,
                paired=paired(base_ok, ok),
            )
        )
    else:
        spread = stats.launch_spread(launches) if len(launches) > 1 else 0.0
        out["flags"] = [
            f
            for f, on in (
                ("contended", contended),
                ("warmup-dominated", warm),
                ("oversubscribed", over),
                ("single-launch", len(launches) < 2),
                ("launches-disagree", spread > stats.LAUNCH_SPREAD),
            )
            if on
        ]
        out["no_baseline"] = (
            "no finished comparable 1-device run" if not base_ok else "baseline did different work"
        )
    return out


def model_verdicts(plan: dict, cells_out: dict) -> dict[str, dict]:
    """Per model: the best strategy on more than one device (not oversubscribed), its speedup [interval] and
    its verdict (`pays off` / `does not pay off` / `cannot tell`), and the flags that make it doubtful."""
    out = {}
    for model in plan["models"]:
        cands = [
            c
            for name in plan["setups"]
            if (c := cells_out.get(f"{model}/{name}"))
            and "speedup" in c
            and c["devices"] > 1
            and "oversubscribed" not in c["flags"]
        ]
        if not cands:
            out[model] = {"verdict": "cannot tell", "why": "no comparable multi-device cell finished"}
            continue
        best = max(cands, key=lambda c: c["speedup"])
        out[model] = {
            "setup": best["setup"],
            "strategy": best["strategy"],
            "devices": best["devices"],
            "speedup": best["speedup"],
            "speedup_ci95": best["speedup_ci95"],
            "verdict": best["verdict"],
            "flags": best["flags"],
            "interval": "within one launch" if "single-launch" in best["flags"] else "95%",
        }
    return out


def check_target(value, target: str) -> bool:
    """`target` is ">= x" or "<= x" on a key of the test results, else of the last epoch's row."""
    op, ref = target.split()
    if not isinstance(value, (int, float)):
        return False
    return value >= float(ref) if op == ">=" else value <= float(ref)


def ci_text(v, ci) -> str:
    return f"{stats.sig(v)} [{stats.sig(ci[0])}-{stats.sig(ci[1])}]"


def print_summary(plan: dict, cells_out: dict, prof: dict) -> list[str]:
    missed = []
    print(
        f"\nsummary ({plan['profile']} profile, batch {plan['batch']}; {os.cpu_count()} CPU cores, "
        f"{plan['n_cuda']} CUDA devices, {plan['threads'] or 'default'} thread(s) per process). step s = median "
        "steady-state step time over the launches' timed windows, [95% interval] by a hierarchical bootstrap "
        "(launches, then windows; with one launch only windows, flagged single-launch); speedup vs the 1-device setup "
        "at the same global batch; efficiency = speedup / devices."
    )
    for model in plan["models"]:
        print(f"\n{model}")
        print(
            f"  {'setup':<22}{'dev':>4}{'win':>5}  {'step s [95% CI]':<28}{'speedup [95% CI]':<24}{'effic.':>7}"
            f"  {'flags':<28}{'final metric'}"
        )
        for name in plan["setups"]:
            c = cells_out.get(f"{model}/{name}")
            if c is None:
                continue
            if "skipped" in c:
                if name not in plan["skipped"]:  # machine-wide skips were said once at the start
                    print(f"  {name:<22}  skipped: {c['skipped']}")
                continue
            if "step_s" not in c:
                print(f"  {name:<22}  no finished run ({', '.join(c['statuses'])})")
                continue
            sp = (
                ci_text(c["speedup"], c["speedup_ci95"])
                if "speedup" in c
                else "- (" + c.get("no_baseline", "") + ")"
            )
            eff = stats.sig(c["efficiency"], 2) if "efficiency" in c else "-"
            metric = f"{c['metric']} {stats.sig(c['value'], 4)}" if c.get("value") is not None else "-"
            for k, tgt in prof.get("targets", {}).get(model, {}).items():
                if all(check_target(v.get(k), tgt) for v in c["values"]) and c["values"]:
                    metric += f" ({k} {tgt} ok)"
                else:
                    missed.append(f"{model} {name}: {k} misses target {tgt}")
                    metric += f" ({k} {tgt} MISSED)"
            print(
                f"  {name:<22}{c['devices']:>4}{c['windows']:>5}  {ci_text(c['step_s'], c['step_s_ci95']):<28}"
                f"{sp:<24}{eff:>7}  {','.join(c['flags']) or '-':<28}{metric}"
            )
    print("\nverdict per model (the best strategy on more than one device, not oversubscribed):")
    for model, v in model_verdicts(plan, cells_out).items():
        if "speedup" not in v:
            print(f"  {model:<18}cannot tell: {v['why']}")
            continue
        flags = f"; doubtful: {', '.join(v['flags'])}" if v["flags"] else ""
        print(
            f"  {model:<18}{v['verdict']}: {v['strategy']} on {v['devices']} x{ci_text(v['speedup'], v['speedup_ci95'])}"
            f" ({v['interval']} interval){flags}"
        )
    disagree = [
        f"{k} {', '.join(stats.sig(x) for x in c['launch_step_s'])} s"
        for k, c in cells_out.items()
        if len(ls := c.get("launch_step_s") or []) > 1 and stats.spread(ls) > stats.LAUNCH_SPREAD
    ]
    if disagree:
        print("launches that disagree (median step per launch): " + "; ".join(disagree))
    print("\nflags: " + "; ".join(f"{k} = {v}" for k, v in stats.FLAGS.items()))
    return missed
