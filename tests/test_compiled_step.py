"""The compiled decode step (``compile=True``, :class:`dalle_fast.engine._CompiledStep`): the same codes as
the eager step for the same seeds (native DALLE and the DALLE-pytorch adapter, guidance, best-of-N rows
sharing text caches, priming), one graph reused across positions and generations, and compile failures
that raise (``True``) or warn and decode eagerly (``None``). Models are tiny: each new model, shape or set
of sampling options compiles one more graph (seconds each)."""
import pytest
import torch

import dalle_fast.engine as engine_mod
from dalle_fast.engine import CompileFallbackWarning, Engine, SampleOptions
from dalle_fast.generate import generate_codes
from dalle_fast.models.dalle import DALLE, DALLEConfig
from dalle_fast.ops import sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DALLEConfig(text_vocab=40, image_vocab=24, text_len=5, image_size=4, dim=32, depth=4, heads=2, dim_head=16,
                      kinds=("row", "col", "conv_like", "full"), conv_like_kernel_size=2)
    m = DALLE(cfg).eval()
    with torch.no_grad():  # larger random weights than the init: every layer shapes the logits
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("opts", [dict(temperature=0.8, top_k=6), dict(cfg_scale=3.0, top_p=0.9)])
def test_compiled_codes_equal_eager(model, opts):
    """2 prompts x 3 candidates (rows share their prompt's text cache), with and without guidance."""
    text = torch.randint(0, 35, (2, 4), generator=torch.Generator().manual_seed(1))
    eager = generate_codes(model, text, 3, seed=5, compile=False, **opts)
    before = _graphs()
    compiled = generate_codes(model, text, 3, seed=5, compile=True, **opts)
    assert _graphs() == before + 1  # one graph for all 15 steps
    assert torch.equal(compiled, eager)
    assert len(set(eager.flatten().tolist())) > 4  # not degenerate
    # another generation of the same shapes and options reuses the graph: new seeds, new codes, still equal
    again = generate_codes(model, text, 3, seed=6, compile=True, **opts)
    assert _graphs() == before + 1
    assert torch.equal(again, generate_codes(model, text, 3, seed=6, compile=False, **opts))
    assert not torch.equal(again, compiled)


def test_compiled_with_priming(model):
    text = torch.randint(0, 35, (2, 4), generator=torch.Generator().manual_seed(2))
    prime = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(3))
    opts = dict(temperature=0.8, top_k=6, seed=9, prime=prime)  # the graph of the unguided test above
    compiled = generate_codes(model, text, 3, compile=True, **opts)
    assert torch.equal(compiled.flatten(2)[:, :, :5], prime[:, None].expand(-1, 3, -1))
    assert torch.equal(compiled, generate_codes(model, text, 3, compile=False, **opts))


def test_the_default_is_the_eager_step(model):
    """compile=None (the default) runs the eager step on the CPU at first: no graph is compiled."""
    text = torch.randint(0, 35, (1, 4))
    before = _graphs()
    generate_codes(model, text, 2, seed=0, temperature=0.5)  # options no compiled graph has had
    assert _graphs() == before


@pytest.fixture
def modules_step(monkeypatch):
    """The eager step runs the blocks' modules, not the branch ops (as for a model they do not compute,
    or in bfloat16): compile=None's ski-rental rule applies."""
    from dalle_fast.models.dalle import Block
    monkeypatch.setattr(Block, "step_branches", lambda *args: None)


def test_the_default_stays_eager_where_the_eager_step_runs_the_branch_ops(model, monkeypatch):
    """Where the eager step runs one op per branch (faster than the compiled step), compile=None never
    compiles, however long the process has decoded eagerly."""
    from dalle_fast.ops.branch import AttentionBranch
    if not AttentionBranch.serves(torch.device("cpu"), torch.float32):
        pytest.skip("decode_attention is forced off the cpu backend ($DALLE_FAST_BACKEND)")
    text = torch.randint(0, 35, (1, 4), generator=torch.Generator().manual_seed(4))
    opts = dict(seed=3, temperature=0.7, top_k=4)
    monkeypatch.setenv("DALLE_FAST_COMPILE_AFTER", "0")
    before = _graphs()
    first = generate_codes(model, text, 2, **opts)
    assert torch.equal(generate_codes(model, text, 2, **opts), first)
    assert _graphs() == before
    assert torch.equal(generate_codes(model, text, 2, compile=True, **opts), first)  # asked for: compiled
    assert _graphs() == before + 1


def test_the_default_compiles_once_eager_decoding_has_cost_a_compile(model, monkeypatch, modules_step):
    """compile=None: eager until the process has decoded this model, rows and options eagerly for
    $DALLE_FAST_COMPILE_AFTER seconds, then compiled (the same codes)."""
    text = torch.randint(0, 35, (1, 4), generator=torch.Generator().manual_seed(4))
    opts = dict(seed=3, temperature=0.6, top_k=5)  # options no other test compiles
    monkeypatch.setenv("DALLE_FAST_COMPILE_AFTER", "1e-9")
    before = _graphs()
    first = generate_codes(model, text, 2, **opts)  # nothing decoded eagerly yet: eager, timed
    assert _graphs() == before
    second = generate_codes(model, text, 2, **opts)  # past the threshold: compiled
    assert _graphs() == before + 1
    assert torch.equal(first, second)
    assert torch.equal(generate_codes(model, text, 3, **opts)[:, :2], first)  # 3 rows: eager again
    assert _graphs() == before + 1
    monkeypatch.setenv("DALLE_FAST_COMPILE_AFTER", "inf")
    assert torch.equal(generate_codes(model, text, 2, **opts), first)  # never compiles: eager
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("DALLE_FAST_COMPILE_AFTER", bad)
        with pytest.raises(ValueError, match=r"\$DALLE_FAST_COMPILE_AFTER must be a number of seconds"):
            generate_codes(model, text, 2, **opts)


def test_compile_argument_checks(model):
    text = torch.randint(0, 35, (1, 4))
    with pytest.raises(ValueError, match="compile must be"):
        generate_codes(model, text, compile="yes")
    with pytest.raises(ValueError, match="compile needs attention='sparse'"):
        generate_codes(model, text, compile=True, attention="dense")
    engine = Engine(model, text, 1, text_len=5, seeds=torch.zeros(1, dtype=torch.int64),
                    opts=SampleOptions(1.0, 1.0, 0, 1.0), guided=False, sample=sample)
    with pytest.raises(ValueError, match="compile: a CUDA-graph step"):
        engine.decode(16, cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="compile must be"):
        engine.decode(16, compile="yes")


def test_compile_refused_on_the_reference_backend(model, monkeypatch):
    monkeypatch.setenv("DALLE_FAST_BACKEND", "reference")
    with pytest.raises(ValueError, match="compile: .*reference"):
        generate_codes(model, torch.randint(0, 35, (1, 4)), compile=True)
    assert engine_mod.resolve_compile(None, torch.device("cpu"), default=True) is False  # the default: eager


class _Breaking:
    """The micro model's step API with a decode step torch.compile(fullgraph=True) cannot capture."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode_step(self, tokens, pos, index):
        torch._dynamo.graph_break()
        return self.model.decode_step(tokens, pos, index)


def _engine(model, step_model=None):
    text = torch.randint(0, 35, (1, 4), generator=torch.Generator().manual_seed(4))
    return Engine(step_model or model, text, 2, text_len=5, seeds=torch.arange(2), opts=SampleOptions(1.0, 1.0, 0, 1.0),
                  guided=False, sample=sample)


def test_compile_failure_raises(model):
    engine = _engine(model, _Breaking(model))
    with torch.no_grad(), pytest.raises(RuntimeError, match="compile: torch.compile could not compile the decode "
                                                            "step of _Breaking"):
        engine.decode(16, compile=True)


def test_compile_failure_with_the_default_warns_and_decodes_eagerly(model):
    with torch.no_grad():
        eager = _engine(model).decode(16)
        with pytest.warns(CompileFallbackWarning, match="could not compile the decode step of _Breaking"):
            fallback = _engine(model, _Breaking(model)).decode(16, compile=None)
    assert torch.equal(fallback, eager)


def test_auto_compile_that_fails_warns_once_then_stays_eager(model, monkeypatch, modules_step):
    import warnings
    monkeypatch.setenv("DALLE_FAST_COMPILE_AFTER", "0")
    breaking = _Breaking(model)
    with torch.no_grad():
        eager = _engine(model).decode(16)
        with pytest.warns(CompileFallbackWarning, match="could not compile the decode step of _Breaking"):
            first = _engine(model, breaking).decode(16, compile="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)  # not tried again for this model and key
            again = _engine(model, breaking).decode(16, compile="auto")
    assert torch.equal(first, eager) and torch.equal(again, eager)


def test_recompile_limit_raises(model, monkeypatch):
    """Past RECOMPILE_LIMIT graphs of the step the call raises instead of running eagerly unannounced."""
    text = torch.randint(0, 35, (2, 4))
    generate_codes(model, text, 3, seed=0, temperature=0.8, top_k=6, compile=True)  # compiled (or cached) graph
    monkeypatch.setattr(engine_mod, "RECOMPILE_LIMIT", 1)
    with pytest.raises(RuntimeError, match="compile: .*FailOnRecompileLimitHit"):
        generate_codes(model, text, 3, seed=0, temperature=0.8, top_k=7, compile=True)  # other options: new graph


def _dalle_pytorch_and_vae():
    """(the adapter module, the dalle_pytorch package, a seeded tiny DiscreteVAE); skips without the package."""
    import dalle_fast.integrations.dalle_pytorch as dfp
    try:
        dp = dfp.import_dalle_pytorch(stand_ins=True)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"dalle-pytorch cannot be imported ({e})")
    torch.manual_seed(0)
    return dfp, dp, dp.DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)


def test_adapter_compiled_codes_equal_eager():
    """A DALLE-pytorch model with token shift and rotary embeddings (the step indexes them on the
    device), guidance and top-k sampling."""
    dfp, dp, vae = _dalle_pytorch_and_vae()
    m = dp.DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=3, heads=2, dim_head=16,
                 attn_types=("full", "axial_row", "conv_like"), shift_tokens=True, rotary_emb=True).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, dp.transformer.LayerScale):
                mod.scale.uniform_(0.5, 1.5)
        m.to_logits[1].weight.mul_(4)
    text = torch.randint(1, 44, (3, 6), generator=torch.Generator().manual_seed(1))
    text[0, 4:] = 0
    kw = dict(filter_thres=0.6, temperature=0.9, cond_scale=2.5, seed=3)
    eager = dfp.generate(m, text, compile=False, **kw)
    compiled = dfp.generate(m, text, compile=True, **kw)
    assert torch.equal(compiled, eager)
    assert len(set(eager.flatten().tolist())) > 4
    with pytest.raises(ValueError, match="compile must be"):
        dfp.generate(m, text, compile=1, **kw)


@pytest.mark.parametrize("options", [dict(reversible=True, attn_types=("full", "axial_row")),
                                     dict(shared_attn_ids=(0, 0), shared_ff_ids=(0, 0), attn_types=("full",))],
                         ids=["reversible", "shared-layers"])
def test_adapter_compiled_codes_equal_eager_for_reversible_and_shared_layers(options):
    """The reversible recurrence and layers sharing one module (a KV cache per layer position) in
    the compiled step."""
    dfp, dp, vae = _dalle_pytorch_and_vae()
    m = dp.DALLE(dim=32, vae=vae, num_text_tokens=64, text_seq_len=8, depth=2, heads=2, dim_head=16,
                 **options).eval()
    text = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    eager = dfp.generate(m, text, seed=3, cond_scale=3.0, compile=False)
    compiled = dfp.generate(m, text, seed=3, cond_scale=3.0, compile=True)
    assert torch.equal(compiled, eager) and len(set(eager.flatten().tolist())) > 4
