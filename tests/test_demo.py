"""`dalle-fast demo --quick` end to end: trains, generates, scores and writes the report (not its accuracy)."""
import json
import re

from PIL import Image

from dalle_fast.cli import main


def test_demo_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--seed", "3"]) == 0
    assert "demo report" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Smoke run" in report and "## Machine and timings" in report
    rows = re.findall(r"^\| (seen|held-out|chance) \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|$", report, re.M)
    assert [(split, int(n)) for split, n, *_ in rows] == [
        (split, n) for split in ("seen", "held-out", "chance") for n in (1, 4, 16)]
    for *_, first, reranked, any_ in rows:  # percentages, and a perfect reranker bounds the others
        assert 0 <= float(first) <= 100 and 0 <= float(reranked) <= float(any_) <= 100
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == {"seen", "held-out"}
    held = set(results["splits"]["held-out"]["captions"])
    assert held and not held & set(results["splits"]["seen"]["captions"])
    assert all(re.search(r"red triangle|green square|blue circle", c) for c in held)
    assert results["timings_s"]["total_s"] > 0 and results["machine"]["cores"] >= 1
    for name in ("seen_reranked.png", "heldout_reranked.png"):
        assert name in report
        w, h = Image.open(out / name).size  # 16 candidates of 32 px per row, one row per caption (2)
        assert (w, h) == (2 + 16 * 34, 2 + 2 * 34)


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--candidates", "10"]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--dvae-steps", "0"]) == 2
    assert "--dvae-steps" in capsys.readouterr().err
