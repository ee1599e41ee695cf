"""`dalle-fast train` (dVAE codes cached once as uint16) and `dalle-fast generate` end to end, tiny."""
import numpy as np
from PIL import Image

from dalle_fast import checkpoint as ck
from dalle_fast.cli import main
from dalle_fast.models.dalle import DALLE


def test_cli_train_and_generate(tmp_path, capsys):
    common = ["--batch-size", "4", "--shapes-length", "12", "--no-progress", "--device", "cpu"]
    assert main(["train-vae", "--steps", "1", "--out", str(tmp_path / "dvae")] + common) == 0
    assert main(["train-clip", "--steps", "1", "--out", str(tmp_path / "clip"), "--vocab-size", "400",
                 "--text-len", "15"] + common) == 0
    train = ["train", "--dvae", str(tmp_path / "dvae"), "--tokenizer", str(tmp_path / "clip" / "tokenizer.json"),
             "--steps", "2", "--out", str(tmp_path / "dalle")] + common
    assert main(train) == 0
    codes = np.load(tmp_path / "dalle" / "codes" / "codes.npy")
    assert codes.dtype == np.uint16 and codes.shape == (12, 8, 8)
    mtime = (tmp_path / "dalle" / "codes" / "codes.npy").stat().st_mtime_ns
    model = ck.load_model(tmp_path / "dalle")
    assert isinstance(model, DALLE) and model.config.image_size == 8 and model.config.image_vocab == 512
    # resume: the cached codes are reused, training continues from step 2
    assert main(train[:train.index("--steps") + 1] + ["3"] + train[train.index("--steps") + 2:]
                + ["--resume", "auto"]) == 0
    assert (tmp_path / "dalle" / "codes" / "codes.npy").stat().st_mtime_ns == mtime
    assert ck.latest_checkpoint(tmp_path / "dalle").name == "checkpoint-00000003.json"
    capsys.readouterr()
    out = tmp_path / "samples"
    assert main(["generate", "a red circle above a blue square", "--checkpoint", str(tmp_path / "dalle"), "-n", "4",
                 "--rerank", "--clip", str(tmp_path / "clip"), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--cfg-scale", "2"]) == 0
    assert "best CLIP score" in capsys.readouterr().out
    assert Image.open(out / "grid.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2 grid of 32 px images
    assert Image.open(out / "top.png").size == (36, 36)
    # clear errors, no traceback
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "clip")]) == 2  # not a transformer
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "dalle"), "--rerank"]) == 2  # no --clip
    assert "error" in capsys.readouterr().err


def test_bench_generate_quick(tmp_path):
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[1] / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--repeat", "1", "-n", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generate.json").read_text())
    assert [r["mode"] for r in result["results"]] == ["sparse", "dense", "none"]
    assert all(r["images_per_s"] > 0 for r in result["results"]) and "torch" in result["machine"]
