"""The stable public API: __all__, lazy imports, one version, and the example that runs in CI."""
import os
import subprocess
import sys
from pathlib import Path

import dalle_fast

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(dalle_fast.__file__).resolve().parent  # the package under test (installed or in place)


def run_python(args, tmp_path, **env):
    """Runs python in ``tmp_path`` (not the checkout) importing the same dalle_fast as this process."""
    env = os.environ | {"PYTHONPATH": str(PACKAGE_DIR.parent)} | env
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)


def test_all_names_resolve():
    for name in dalle_fast.__all__:
        assert getattr(dalle_fast, name) is not None, name
    assert {"Layout", "paper_schedule", "sparse_attention", "decode_attention", "sample", "nn", "SparseAttention",
            "DALLE", "DVAE", "CLIP", "generate_codes", "generate_images", "integrations"} <= set(dalle_fast.__all__)
    assert dalle_fast.nn.SparseAttention is dalle_fast.SparseAttention
    assert set(dalle_fast.__all__) <= set(dir(dalle_fast))


def test_import_is_light_and_version_is_single_sourced(tmp_path):
    code = ("import sys, dalle_fast; "
            "heavy = [m for m in ('dalle_fast.generate', 'dalle_fast.tokenizer', 'dalle_fast.models', "
            "'tokenizers', 'dalle_fast.integrations.dalle_pytorch') if m in sys.modules]; "
            "assert not heavy, heavy; print(dalle_fast.__version__)")
    out = run_python(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    version_file = (PACKAGE_DIR / "version.py").read_text()
    assert out.stdout.strip() == dalle_fast.__version__ and f'"{dalle_fast.__version__}"' in version_file


def test_documented_dotted_names_resolve_after_a_plain_import(tmp_path):
    """The dotted names the docs use work after ``import dalle_fast`` alone (lazy submodules)."""
    code = ("import dalle_fast; "
            "print(dalle_fast.integrations.dalle_pytorch.__name__, dalle_fast.models.dvae_openai.__name__, "
            "dalle_fast.nn.functional.vocab_slice_cross_entropy.__name__)")
    out = run_python(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dalle_fast.integrations.dalle_pytorch", "dalle_fast.models.dvae_openai",
                                  "vocab_slice_cross_entropy"]


def test_unknown_attribute():
    try:
        dalle_fast.not_a_name
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_example_use_in_your_model_runs(tmp_path):
    out = run_python([str(ROOT / "examples" / "use_in_your_model.py")], tmp_path, OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert "cached == full forward" in out.stdout


def test_sparse_attention_module_refuses_bools_and_checks_qkv_input():
    """dim=True crashed inside nn.Linear (TypeError) and heads=True silently meant one head; the
    public .qkv(x) failed with an unpacking or matmul error instead of naming x."""
    import pytest
    import torch

    layout = dalle_fast.Layout("row", 3, 2)
    for kwargs, name in ((dict(dim=True), "dim"), (dict(heads=True), "heads"), (dict(dim_head=True), "dim_head")):
        args = dict(dim=16, heads=2, dim_head=8) | kwargs
        with pytest.raises(ValueError, match=name):
            dalle_fast.SparseAttention(layout=layout, **args)
    attn = dalle_fast.SparseAttention(16, 2, 8, layout)
    for x in (torch.randn(layout.seq_len, 16), torch.randn(1, layout.seq_len, 15)):
        with pytest.raises(ValueError, match="x must be"):
            attn.qkv(x)
    q, k, v = attn.qkv(torch.randn(2, layout.seq_len, 16))
    assert q.shape == k.shape == v.shape == (2, 2, layout.seq_len, 8)


def test_vocab_slice_cross_entropy_refuses_non_int64_targets():
    """int32, float and bool targets failed inside F.cross_entropy with a RuntimeError."""
    import pytest
    import torch

    from dalle_fast.nn.functional import vocab_slice_cross_entropy

    head = torch.nn.Linear(8, 20)
    h, target = torch.randn(2, 5, 8), torch.randint(0, 6, (2, 5))
    for bad in (target.int(), target.float(), target.bool(), target.tolist()):
        with pytest.raises(ValueError, match="target must be an int64"):
            vocab_slice_cross_entropy(h, head, 4, 10, bad)
    full = head(h).masked_fill((torch.arange(20) < 4) | (torch.arange(20) >= 10), float("-inf"))
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), (target + 4).flatten())
    torch.testing.assert_close(vocab_slice_cross_entropy(h, head, 4, 10, target), expected)
