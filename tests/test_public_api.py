"""The stable public API: __all__, lazy imports, one version, and the example that runs in CI."""
import os
import subprocess
import sys
from pathlib import Path

import dalle_fast

ROOT = Path(__file__).resolve().parents[1]


def test_all_names_resolve():
    for name in dalle_fast.__all__:
        assert getattr(dalle_fast, name) is not None, name
    assert {"Layout", "paper_schedule", "sparse_attention", "decode_attention", "sample", "nn", "SparseAttention",
            "DALLE", "DVAE", "CLIP", "generate_codes", "generate_images", "integrations"} <= set(dalle_fast.__all__)
    assert dalle_fast.nn.SparseAttention is dalle_fast.SparseAttention
    assert set(dalle_fast.__all__) <= set(dir(dalle_fast))


def test_import_is_light_and_version_is_single_sourced():
    code = ("import sys, dalle_fast; "
            "heavy = [m for m in ('dalle_fast.generate', 'dalle_fast.tokenizer', 'dalle_fast.models', "
            "'tokenizers', 'dalle_fast.integrations.dalle_pytorch') if m in sys.modules]; "
            "assert not heavy, heavy; print(dalle_fast.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    version_file = (ROOT / "dalle_fast" / "version.py").read_text()
    assert out.stdout.strip() == dalle_fast.__version__ and f'"{dalle_fast.__version__}"' in version_file


def test_unknown_attribute():
    try:
        dalle_fast.not_a_name
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_example_use_in_your_model_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "use_in_your_model.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "cached == full forward" in out.stdout
