"""make new-model: a script of your own from scripts/mlp.py, never over a file, refused in one line."""

import ast

from bench import new_model


def test_the_template_is_mlp_with_its_parts_marked_and_renamed(tmp_path):
    dest = tmp_path / "deep" / "my_net.py"
    assert new_model.main(["--name", "my_net", "--dest", str(dest), "--no_smoke"]) == 0
    text = dest.read_text()
    ast.parse(text)
    assert 'Session(Config, "my_net", METRICS' in text and '"mlp"' not in text
    for part in ("CONFIG", "METRIC", "DATA", "MODEL"):
        assert text.count(f"# YOUR {part}:") == 1, part
    assert text.startswith('"""my_net: your model')


def test_bad_names_and_existing_files_are_refused_in_one_line(tmp_path, capsys):
    dest = tmp_path / "x.py"
    dest.write_text("mine\n")
    for argv in (["--name", "1net"], ["--name", "class"], ["--name", "ok", "--dest", str(tmp_path / "x.txt")],
                 ["--name", "ok", "--dest", str(dest)]):  # fmt: skip
        assert new_model.main([*argv, "--no_smoke"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert dest.read_text() == "mine\n"  # not overwritten
    assert not list(tmp_path.glob(".*.part"))
