"""What the predictions say, in words: the range each kind of figure has shown in validation
(shared/residuals.yaml), a verdict per prediction (`pays off`, `does not pay off`, `cannot tell`), one
sentence per model and hardware, one verdict line per N, and what to do per N and why. Torch-free; the
predictions come from shared/projection.py `project`."""

from __future__ import annotations

from pathlib import Path


def sentence(model: str, hw_name: str, preds: list[dict]) -> str:
    """One line answering "does N devices pay off?" for a model on a hardware profile: at the same global
    batch (strong scaling) first, then with the batch per replica kept (weak), else what holds it back."""

    def pays(scaling):
        ok = [
            p
            for p in preds
            if p["scaling"] == scaling and p["speedup"] > 1.05 and p["bottleneck"] != "memory"
        ]
        if not ok:
            return None
        first = min(ok, key=lambda p: (p["devices"], -p["speedup"]))
        best = max(ok, key=lambda p: p["speedup"])
        return (
            f"{first['strategy']} pays off from N = {first['devices']} (x{first['speedup']:.2f}, global batch "
            f"{first['global_batch']}); best {best['strategy']} at N = {best['devices']} (x{best['speedup']:.2f})"
        )

    def held_back(scaling):
        mine = [p for p in preds if p["scaling"] == scaling]
        if not mine:
            return "nothing projected"
        top = max(mine, key=lambda p: p["speedup"])
        share = top["parts_s"]["communication"] / top["step_s"]
        return (
            f"nothing pays off (best {top['strategy']} at N = {top['devices']}: x{top['speedup']:.2f}, "
            f"{top['bottleneck']}-bound, communication {share:.0%} of the step)"
        )

    strong, weak = pays("strong"), pays("weak")
    if strong:
        return f"{model} on {hw_name}: at the same global batch {strong}"
    if weak:
        return f"{model} on {hw_name}: at the same global batch {held_back('strong')}; with the batch per replica kept, {weak}"
    return f"{model} on {hw_name}: at the same global batch {held_back('strong')}; with the batch per replica kept, {held_back('weak')}"


# ----------------------------------------------------------------------------- ranges and verdicts

VERDICTS = ("pays off", "does not pay off", "cannot tell")
SIMPLEST = ("single", "ddp", "fsdp", "model_split", "pipeline_1f1b", "pipeline", "hybrid")


def load_residuals(path: str | Path | None = None) -> dict:
    """The validation residuals every prediction's range comes from (shared/residuals.yaml)."""
    import yaml

    return yaml.safe_load(Path(path or Path(__file__).with_name("residuals.yaml")).read_text())


def with_range(pred: dict, residuals: dict) -> dict:
    """`pred` with the range its kind of figure has shown in validation, and a verdict.

    `residuals` (shared/residuals.yaml): per kind, `measured` (compute measured on the device projected) or
    `modelled` (a GPU modelled from its op trace), the lowest and highest relative error, predicted over
    measured minus 1, of the step time and of the speedup over one device. The truth was within
    prediction / (1 + high) .. prediction / (1 + low) there, so that is the range. Verdict: `pays off` when the
    whole speedup range is above 1, `does not pay off` when it is below, else `cannot tell`; one device is
    the baseline (no verdict)."""
    kind = "measured" if pred["compute_source"].startswith("measured") else "modelled"
    r = residuals.get(kind) or {}

    def span(value: float, errors: dict | None) -> list[float] | None:
        if not errors:
            return None
        return [value / (1 + errors["high"]), value / (1 + errors["low"])]

    step, speedup = span(pred["step_s"], r.get("step")), span(pred["speedup"], r.get("speedup"))
    if pred["devices"] == 1 and pred["strategy"] == "single":
        verdict = "baseline"
    elif speedup is None:
        verdict = "cannot tell"
    else:
        verdict = VERDICTS[0] if speedup[0] > 1 else VERDICTS[1] if speedup[1] < 1 else VERDICTS[2]
    return {**pred, "compute_kind": kind, "step_range_s": step, "speedup_range": speedup, "verdict": verdict,
            "range_source": r.get("source", "no validation of this kind: no range")}  # fmt: skip


def simplest_fast(preds: list[dict]) -> dict:
    """The simplest strategy within 5% of the fastest: FSDP or a pipeline only where the figures say so."""
    top = max(p["speedup"] for p in preds)
    return min((p for p in preds if p["speedup"] >= 0.95 * top), key=lambda p: SIMPLEST.index(p["strategy"]))


def candidates(preds: list[dict], n: int, scaling: str) -> list[dict]:
    """The predictions to choose from at N devices: those whose batch fits a device's memory, model_split only
    when nothing else fits (it runs one device at a time: never faster than one device)."""
    fit = [p for p in preds if p["devices"] == n and p["scaling"] == scaling and p["bottleneck"] != "memory"]
    return [p for p in fit if p["strategy"] != "model_split"] or fit


def verdict_lines(model: str, hw_name: str, preds: list[dict]) -> list[str]:
    """Per N > 1, one line: the simplest strategy within 5% of the fastest (a batch that does not fit is no option;
    model_split only when nothing else fits, as in recommendation_lines),
    its speedup and range, the verdict, whether compute was measured or modelled, and the bottleneck."""
    out = []
    for scaling in ("strong", "weak"):
        for n in sorted({p["devices"] for p in preds if p["devices"] > 1 and p["scaling"] == scaling}):
            mine = candidates(preds, n, scaling)
            if not mine:
                out.append(f"{model} on {hw_name}, N = {n} ({scaling}): no strategy fits in memory")
                continue
            best = simplest_fast(mine)
            rng = best.get("speedup_range")
            band = f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else ""
            verdict = best.get("verdict", "cannot tell")
            figure = f"{best['strategy']} x{best['speedup']:.2f}{band}, {best['bottleneck']}-bound"
            advice = f"stay on one device (best: {figure})" if verdict == VERDICTS[1] else figure
            out.append(f"{model} on {hw_name}, N = {n} ({scaling} scaling): {verdict}: {advice}, compute "
                       f"{best['compute_source']}")  # fmt: skip
    return out


WHY = {  # the part of the step that dominates: why it pays off, and why not
    "compute": ("the step is mostly compute, which the devices share",
                "the devices do not finish it sooner here (a smaller batch per device runs less efficiently, or "
                "the processes share the host's cores and memory bandwidth)"),
    "communication": ("the exchange of gradients or activations is small next to the compute saved",
                      "exchanging gradients or activations costs more than the compute it saves"),
    "input": ("each process brings its own input pipeline, and the pipeline sets the pace",
              "the input pipeline, not the device, sets the pace"),
    "bubble": ("the pipeline's stages overlap", "the pipeline's stages wait for each other (its bubble)"),
}  # fmt: skip


def recommendation_lines(model: str, hw_name: str, preds: list[dict]) -> list[str]:
    """What to do, one line per N > 1 at the same batch per device (weak scaling; strong where no weak was
    projected): the strategy to use (the simplest within 5% of the fastest; model_split only when nothing else
    fits, as it runs one device at a time), its expected speedup and range, and why, from the part of the step
    that dominates; or "stay on one device" and why; or "cannot tell" where the range spans 1.0."""
    scaling = "weak" if any(p["scaling"] == "weak" for p in preds) else "strong"
    out = [f"{model} on {hw_name}, what to do ({scaling} scaling):"]
    for n in sorted({p["devices"] for p in preds if p["devices"] > 1 and p["scaling"] == scaling}):
        fit = candidates(preds, n, scaling)
        if not fit:
            out.append(
                f"  N = {n}: no strategy fits this batch in a device's memory: a smaller batch, or more memory"
            )
            continue
        best = simplest_fast(fit)
        rng = best.get("speedup_range")
        # the range first: where measured speedups fell against predictions of this kind (it may lie wholly
        # below the point, where validations found the model optimistic)
        figure = (
            f"x{rng[0]:.2f}-{rng[1]:.2f} (point x{best['speedup']:.2f}"
            if rng
            else f"x{best['speedup']:.2f} ("
        )
        figure += f"{', ' if rng else ''}{best['compute_source'].split(' ')[0]})"
        verdict = best.get("verdict", "cannot tell")
        part = best["bottleneck"]
        share = best["parts_s"].get(part, 0.0) / best["step_s"] if best["step_s"] else 0.0
        gain, loss = WHY.get(part, ("it dominates", "it dominates"))
        why = f"{part} is {share:.0%} of the step: {gain if verdict == VERDICTS[0] else loss}"
        if verdict == VERDICTS[0]:
            out.append(f"  N = {n}: use {best['strategy']}, expected {figure}; {why}")
        elif verdict == VERDICTS[1]:
            out.append(f"  N = {n}: stay on one device (best: {best['strategy']} {figure}); {why}")
        else:
            out.append(f"  N = {n}: cannot tell ({best['strategy']} {figure}: the range spans 1.0); {why}; "
                       "measure it (make bench-all)")  # fmt: skip
    return out
