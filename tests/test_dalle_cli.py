"""`dalle-fast train` (dVAE codes cached once as uint16) and `dalle-fast generate` end to end, tiny."""
import json

import numpy as np
import pytest
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
    assert isinstance(model, DALLE) and model.config.image_size == 8 and model.config.image_vocab == 128  # demo dVAE
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
    assert Image.open(out / "grid-1x.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2 grid of 32 px images
    assert Image.open(out / "top-1x.png").size == (36, 36)
    assert Image.open(out / "grid.png").size == (4 * 70, 4 * 70)  # viewable: 32 px -> 128 px, nearest neighbour
    assert Image.open(out / "top.png").size == (4 * 36, 4 * 36)
    # clear errors, no traceback
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "clip")]) == 2  # not a transformer
    assert main(["generate", "x", "--checkpoint", str(tmp_path / "dalle"), "--rerank"]) == 2  # no --clip
    assert "error" in capsys.readouterr().err


def _bench_generate():
    """bench/generate.py as a module."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[1] / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_generate_quick(tmp_path):
    import json
    bench = _bench_generate()
    assert bench.main(["--quick", "--repeat", "1", "-n", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generate.json").read_text())
    assert [r["mode"] for r in result["results"]] == ["sparse", "dense", "none"]
    assert all(r["images_per_s"] > 0 for r in result["results"]) and "torch" in result["machine"]


def test_bench_generate_times_the_compiled_step(tmp_path):
    """--compile adds the sparse mode with its decode step compiled, and its compile time."""
    import json
    bench = _bench_generate()
    assert bench.main(["--preset", "tiny", "--modes", "sparse", "--compile", "-n", "2", "--repeat", "1",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generate.json").read_text())
    assert [r["mode"] for r in result["results"]] == ["sparse", "compiled"]
    assert all(r["images_per_s"] > 0 for r in result["results"]) and result["compile_s"] is not None


def test_bench_generate_estimates_the_uncached_mode(tmp_path):
    """Without --full the no-cache mode is estimated from a few sampled steps (with guidance here)."""
    import json
    bench = _bench_generate()
    assert bench.main(["--preset", "tiny", "--modes", "none", "--batch", "1", "-n", "1", "--repeat", "1",
                       "--sample-steps", "1", "--cfg-scale", "3", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "generate.json").read_text())["results"]
    assert row["mode"] == "none" and row["how"].startswith("estimated") and row["mean_step_s"] > 0


def test_cli_train_caches_by_content_and_records_the_dvae_file(tmp_path, capsys):
    """The cached codes are rebuilt when the tokenizer's merges or the image folder's files change
    (not only their sizes or path), and the transformer records the dVAE checkpoint file it was
    trained on, which generate checks by its weights' hash."""
    import torch

    from dalle_fast.tokenizer import Tokenizer

    common = ["--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main(["train-vae", "--steps", "1", "--shapes-length", "8", "--out", str(tmp_path / "dvae")] + common) == 0
    folder = tmp_path / "images"
    folder.mkdir()
    captions = ["a red circle", "a blue square", "a green triangle", "a red square"]
    rng = np.random.default_rng(0)
    for i, cap in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(cap)
    toks = {}
    for name, seed in (("a", 1), ("b", 2)):  # enough distinct text that both reach the full vocabulary
        words = ["".join(np.random.default_rng([seed, i]).choice(list("abcdefghilmnorstu"), 6)) for i in range(400)]
        toks[name] = Tokenizer.train(captions * 5 + words, vocab_size=320, text_len=12)
        toks[name].save(tmp_path / f"tok_{name}.json")
    assert repr(toks["a"]) == repr(toks["b"])  # same sizes: the old cache key could not tell them apart
    out = tmp_path / "dalle"

    def train(tok):
        ck.remove_checkpoints(out)  # a new run each time, over the same codes cache
        assert main(["train", "--dvae", str(tmp_path / "dvae"), "--tokenizer", str(tmp_path / f"tok_{tok}.json"),
                     "--data", str(folder), "--steps", "1", "--out", str(out)] + common) == 0
        return np.load(out / "codes" / "text.npy")

    first = train("a")
    seen = [toks["a"].decode(torch.from_numpy(row.astype(np.int64))) for row in first]  # the folder's item order
    assert sorted(seen) == sorted(captions)
    second = train("b")
    expect = toks["b"].encode(seen, text_len=second.shape[1]).numpy()
    assert np.array_equal(second, expect) and not np.array_equal(first, second)
    edited = folder / f"img{captions.index(seen[0])}.txt"
    edited.write_text("a blue circle")
    third = train("a")
    assert toks["a"].decode(torch.from_numpy(third[0].astype(np.int64))) == "a blue circle"
    # the dVAE file, not its directory: training the dVAE on does not change what generate decodes with
    meta = json.loads(ck.latest_checkpoint(out).read_text())
    assert meta["extra"]["dvae_checkpoint"].endswith("checkpoint-00000001.json")
    assert meta["extra"]["dvae_sha256"] == json.loads(ck.latest_checkpoint(tmp_path / "dvae").read_text())["weights_sha256"]
    assert main(["train-vae", "--steps", "2", "--shapes-length", "8", "--out", str(tmp_path / "dvae"),
                 "--resume", "auto"] + common) == 0
    gen = ["generate", "a red circle", "--checkpoint", str(out), "-n", "1", "--out", str(tmp_path / "s"),
           "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(gen) == 0
    path = ck.latest_checkpoint(out)
    path.write_text(json.dumps({**meta, "extra": {**meta["extra"], "dvae_sha256": "0" * 64}}))
    assert main(gen) == 2
    assert "not the dVAE the transformer was trained on" in capsys.readouterr().err


def test_cli_resume_refuses_other_inputs_before_touching_the_run(tmp_path, capsys):
    """Resuming with another tokenizer or dVAE than the run was trained with is refused before
    OUT/tokenizer.json (which generate reads) or the cached codes are replaced."""
    from dalle_fast.tokenizer import Tokenizer

    common = ["--batch-size", "4", "--shapes-length", "8", "--no-progress", "--device", "cpu"]
    assert main(["train-vae", "--steps", "1", "--out", str(tmp_path / "dvae")] + common) == 0
    assert main(["train-vae", "--steps", "1", "--seed", "1", "--out", str(tmp_path / "dvae2")] + common) == 0
    assert main(["train-clip", "--steps", "1", "--out", str(tmp_path / "clip"), "--vocab-size", "400",
                 "--text-len", "15"] + common) == 0
    other = tmp_path / "other.json"
    words = ["".join(np.random.default_rng(i).choice(list("abcdefgh"), 5)) for i in range(300)]
    Tokenizer.train(words, vocab_size=400, text_len=15).save(other)
    out = tmp_path / "clip" / "tokenizer.json"
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["train-clip", "--steps", "2", "--out", str(tmp_path / "clip"), "--tokenizer", str(other),
                 "--resume", "auto"] + common) == 2
    assert "differs from" in capsys.readouterr().err and out.read_bytes() == before
    train = ["train", "--tokenizer", str(out), "--out", str(tmp_path / "dalle")] + common
    assert main(train + ["--dvae", str(tmp_path / "dvae"), "--steps", "1"]) == 0
    codes = tmp_path / "dalle" / "codes" / "codes.npy"
    mtime = codes.stat().st_mtime_ns
    assert main(train + ["--dvae", str(tmp_path / "dvae2"), "--steps", "2", "--resume", "auto"]) == 2
    assert "was trained with another dvae" in capsys.readouterr().err
    assert codes.stat().st_mtime_ns == mtime
    # and the trainer itself refuses a resume whose *_sha256 inputs differ
    from dalle_fast import checkpoint as ckl
    from dalle_fast.data.codes import CodesDataset
    from dalle_fast.models.dalle import DALLEConfig
    from dalle_fast.train import TrainConfig, train_dalle
    meta = json.loads(ckl.latest_checkpoint(tmp_path / "dalle").read_text())
    with pytest.raises(ValueError, match="another tokenizer"):
        train_dalle(DALLEConfig(**meta["model_config"]), TrainConfig(steps=2, batch_size=4, progress=False),
                    CodesDataset.load(tmp_path / "dalle" / "codes"), tmp_path / "dalle", resume="auto", device="cpu",
                    extra_meta={"dvae_sha256": meta["extra"]["dvae_sha256"], "tokenizer_sha256": "0" * 64})


def test_version_names_the_cpu_kernels_instruction_set(capsys, monkeypatch):
    import dalle_fast
    import torch

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dalle_fast {dalle_fast.__version__} (torch {torch.__version__}); CPU kernels: ")
    assert f"CPU kernels: {dalle_fast.cpu_isa()} (this CPU runs: {', '.join(dalle_fast.available_cpu_isas())})" in out
    with dalle_fast.use_cpu_isa("default"):
        with pytest.raises(SystemExit):
            main(["--version"])
        assert "CPU kernels: default (" in capsys.readouterr().out
