"""The sweep report's line mode: a metric against one swept parameter, a line per value of another,
over the jobs of several sweep folders (written here as Hydra leaves them)."""

from __future__ import annotations

import json

import pytest

from seg_densenet.sweep_report import main


def _job(folder, name, overrides, metrics):
    job = folder / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "summary.json").write_text(json.dumps({"metrics": metrics}))


def test_lines_over_several_sweeps(tmp_path, capsys):
    first, second = tmp_path / "n5", tmp_path / "n3_n10"
    _job(first, "0", ["data.labelled_patients=5", "task=segment"], {"test/dice": 0.61})
    _job(first, "1", ["data.labelled_patients=5", "task=pipeline"], {"test/dice": 0.66})
    _job(second, "0", ["data.labelled_patients=3", "task=segment"], {"test/dice": 0.5})
    _job(second, "1", ["data.labelled_patients=10", "task=pipeline"], {"test/dice": 0.7})
    (second / "2").mkdir()  # a job that did not finish
    out = tmp_path / "figures" / "scarce.png"
    out.parent.mkdir()
    main([str(first), str(second), "--metric", "test/dice", "--x", "data.labelled_patients", "--group", "task",
          "--out", str(out)])  # fmt: skip
    assert out.stat().st_size > 1000
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2].endswith("| 3 | 5 | 10 |")
    assert table[4:] == ["| pipeline | - | 0.660 | 0.700 |", "| segment | 0.500 | 0.610 | - |"]
    with pytest.raises(SystemExit):
        main([str(first), "--x", "data.labelled_patients"])  # --group and --out missing
    assert "go together" in capsys.readouterr().err
