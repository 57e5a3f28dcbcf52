"""The six scripts stay on one skeleton a newcomer reads top to bottom (STYLE.md): same top-level names in
the same order, same signatures, a short main(), few names from shared/, and no reaching into plumbing."""

import ast
from pathlib import Path

import pytest

from bench.launcher import builtin_scripts

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = builtin_scripts()  # every script in scripts/, the six and the Transformer LM
# the top-level names every script defines, in this order (others, e.g. model classes, may sit between)
ORDER = [
    "Config",
    "METRICS",
    "SPLIT_POINTS",
    "UNSUPPORTED",
    "build_model",
    "train_one_epoch",
    "evaluate",
    "main",
]
SIGNATURES = {
    "build_model": ["cfg", "info"],
    "train_one_epoch": ["s", "model", "loader", "optimizer"],
    "evaluate": ["s", "model", "loader"],
    "main": [],
}
MAX_MAIN_LINES = 45
MAX_SHARED_NAMES = 10


def parse(script: str) -> ast.Module:
    return ast.parse((REPO / "scripts" / f"{script}.py").read_text())


def top_level(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_names_in_the_same_order(script):
    names = top_level(parse(script))
    assert [n for n in names if n in ORDER] == ORDER, names


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_signatures(script):
    funcs = {n.name: n for n in parse(script).body if isinstance(n, ast.FunctionDef)}
    for name, args in SIGNATURES.items():
        assert [a.arg for a in funcs[name].args.args] == args, name


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_short_and_shared_imports_are_few(script):
    tree = parse(script)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= MAX_MAIN_LINES
    shared = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("shared")
              for a in n.names]  # fmt: skip
    assert len(shared) <= MAX_SHARED_NAMES, shared
    assert {"Session", "run"} <= set(shared)


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_lifecycle_and_accelerate_idioms(script):
    """The loop goes through the Session (s.*), never the plumbing behind it; backward is Accelerate's."""
    source = (REPO / "scripts" / f"{script}.py").read_text()
    tree = ast.parse(source)
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.body[0]) == "run(main)"
    for forbidden in ("par.", "progress.", "Progress(", "Parallel(", "make_accelerator", "os.environ"):
        assert forbidden not in source, forbidden
    assert "s.accelerator.backward(" in source
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_one_epoch")
    body = ast.unparse(train)
    for call in ("s.epoch_sums(", "s.batches(", "s.step_ok(", "s.step_done(", "optimizer.step()"):
        assert call in body, call


@pytest.mark.parametrize("script", SCRIPTS)
def test_metrics_name_one_primary_and_unsupported_knobs_are_really_unused(script):
    tree = parse(script)
    source = (REPO / "scripts" / f"{script}.py").read_text()
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert sum(bool(m.get("primary")) for m in values["METRICS"].values()) == 1
    unsupported = values["UNSUPPORTED"]
    # a knob is either declared unsupported or used by the script: never silently ignored
    assert ("channels_last" in unsupported) != ("cfg.channels_last" in source)
    assert ("compile" in unsupported) != ("inputs=inputs" in source)
    assert ("microbatches" in unsupported) != ("s.micro_batch_step(" in source)


def test_scripts_differ_in_data_and_model_only():
    """diff mlp.py cnn.py: the loop and main() are the same lines but for the data and model names."""
    mlp, cnn = (ast.unparse(next(n for n in parse(s).body if getattr(n, "name", "") == "train_one_epoch"))
                for s in ("mlp", "cnn"))  # fmt: skip
    assert mlp == cnn
