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
        w, h = Image.open(out / name.replace(".png", "-1x.png")).size  # 32 candidates of 32 px per row,
        assert (w, h) == (2 + 32 * 34, 2 + 2 * 34)  # one row per caption (2)
        assert Image.open(out / name).size == (4 * w, 4 * h)  # the viewable copy: 32 px -> 128 px


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--candidates", "10"]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--dvae-steps", "0"]) == 2
    assert "--dvae-steps" in capsys.readouterr().err
    # sampling arguments are used only after training: refused before anything is trained or written
    for flag, value in (("--temperature", "-1"), ("--temperature", "nan"), ("--cfg-scale", "inf")):
        out = tmp_path / f"bad{flag}{value}"
        assert main(["demo", "--quick", "--out", str(out), flag, value]) == 2
        assert flag in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())


def test_demo_clip_scores_run_on_clip_device(monkeypatch):
    """The demo's CLIP scoring moves caption ids and images to CLIP's device (the GPU with
    --device cuda) a CLIP on the 'meta' device stands in for a GPU."""
    import torch

    from dalle_fast.demo import _clip_scores
    from dalle_fast.models.clip import CLIP, CLIPConfig
    from dalle_fast.tokenizer import Tokenizer

    tok = Tokenizer.train(["a red circle", "a blue square"] * 20, vocab_size=300, text_len=8)
    clip = CLIP(CLIPConfig.for_tokenizer(tok, "tiny", image_size=32)).to("meta")
    seen = []

    def score(ids, images):
        seen.append((ids.device.type, images.device.type, ids.shape[0]))
        return torch.zeros(ids.shape[0])

    monkeypatch.setattr(clip, "score", score)
    scores = _clip_scores(clip, tok, ["a red circle", "a blue square"], torch.rand(2, 3, 3, 32, 32))
    assert seen == [("meta", "meta", 6)] and scores.shape == (2, 3)


def test_demo_dvae_recipe():
    from dalle_fast.demo import demo_dvae_config
    cfg = demo_dvae_config(1000, vocab_size=64, n_hid=16)
    assert cfg.likelihood == "gaussian" and cfg.latent_size == 8 and cfg.vocab_size == 64
    assert (cfg.n_hid, cfg.n_init, cfg.tau_anneal_steps, cfg.kl_warmup_steps) == (16, 16, 1000, 100)


def test_targets_cover_accuracy_reranking_and_time():
    from dalle_fast.demo import targets

    def acc(first1, reranked16):
        return {"accuracy": {"1": {"first": first1}, "16": {"reranked": reranked16}}}

    results = {"splits": {"seen": acc(0.5, 0.7), "held-out": acc(0.3, 0.6)}, "timings_s": {"total_s": 1199.0}}
    assert [met for _, met, _ in targets(results)] == [True, True, True, True]
    results = {"splits": {"seen": acc(0.7, 0.7), "held-out": acc(0.3, 0.59)}, "timings_s": {"total_s": 1200.0}}
    assert [met for _, met, _ in targets(results)] == [False, False, True, False]
