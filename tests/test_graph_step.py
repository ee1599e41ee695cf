"""The CUDA-graph decode step (:class:`dalle_fast.engine._GraphedStep`), native DALLE and the DALLE-pytorch
adapter.

On the CPU the capture is replaced by its body (``_capture`` returns the body itself, ``_warm_up`` runs
it): what remains is the engine's graph mode (one warm-up step, then one capture and a replay per
position, the device-position step the model's ``decode_step`` runs with ``index=None``, priming),
which must give the eager step's codes for the same seeds. Tests marked ``gpu`` capture for real."""
import copy

import pytest
import torch

import dalle_fast.engine as engine_mod
import dalle_fast.generate as generate_mod
from dalle_fast.generate import generate_codes, teacher_forced_logits
from conftest import micro_dalle

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return micro_dalle()


@pytest.fixture
def graph_on_cpu(monkeypatch):
    """The graph mode on the CPU: a capture returns its body, which each replay then runs with the host
    position of the capture (what a CUDA graph would replay). Returns the
    list of calls (``"warm-up"``, ``"capture"``, ``"replay"``); the CPU is let through the
    generate functions' device check."""
    calls = []

    def warm_up(body):
        calls.append("warm-up")
        body()

    def capture(body):
        calls.append("capture")
        engine = body.__self__
        frozen = engine.host_pos  # as in a real capture, the host values the body reads stay those of the capture

        def replay():
            calls.append("replay")
            live, engine.host_pos = engine.host_pos, frozen
            try:
                body()
            finally:
                engine.host_pos = live
        return replay

    monkeypatch.setattr(engine_mod, "_warm_up", warm_up)
    monkeypatch.setattr(engine_mod, "_capture", capture)
    monkeypatch.setattr(generate_mod, "resolve_cuda_graph", lambda cuda_graph, device, sparse=True: bool(cuda_graph))
    return calls


def _text(seed, shape=(2, 4), high=35):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("opts", [dict(temperature=0.8, top_k=6), dict(cfg_scale=3.0, top_p=0.9),
                                  dict(cfg_scale=-0.5, temperature=0.7, top_k=5)])
def test_graph_mode_codes_equal_eager(model, graph_on_cpu, opts):
    """2 prompts x 3 candidates, 16 codes: code 0 from the prefill, 1 warm-up step, 1 capture, 14 replays."""
    text = _text(1)
    eager = generate_codes(model, text, 3, seed=5, cuda_graph=False, compile=False, **opts)
    assert graph_on_cpu == []
    graphed = generate_codes(model, text, 3, seed=5, cuda_graph=True, compile=False, **opts)
    assert graph_on_cpu == ["warm-up", "capture"] + ["replay"] * 14
    assert torch.equal(graphed, eager)
    assert len(set(eager.flatten().tolist())) > 4  # not degenerate


def test_graph_mode_with_priming(model, graph_on_cpu):
    text, prime = _text(2), _text(3, (2, 5), 24)
    opts = dict(temperature=0.8, top_k=6, seed=9, prime=prime, cfg_scale=1.5)
    graphed = generate_codes(model, text, 3, cuda_graph=True, compile=False, **opts)
    assert torch.equal(graphed.flatten(2)[:, :, :5], prime[:, None].expand(-1, 3, -1))
    assert torch.equal(graphed, generate_codes(model, text, 3, cuda_graph=False, compile=False, **opts))


def test_graph_mode_host_position_advances(model, graph_on_cpu):
    """The engine's host position follows the steps in graph mode too (what a later host-side reader sees)."""
    from dalle_fast.engine import Engine, SampleOptions
    from dalle_fast.ops import sample

    cfg = model.config
    with torch.no_grad():  # the decode ops are inference-only
        engine = Engine(model, _text(4, (1, 4)), 2, text_len=cfg.text_len, seeds=torch.arange(2),
                        opts=SampleOptions(1.0, 1.0, 0, 1.0), guided=False, sample=sample)
        try:
            engine.decode(cfg.image_tokens, cuda_graph=True)
            assert engine.host_pos == cfg.text_len + cfg.image_tokens - 1 == int(engine.pos)
        finally:
            engine.close()


def _adapter():
    import dalle_fast.integrations.dalle_pytorch as dfp
    try:
        dp = dfp.import_dalle_pytorch(stand_ins=True)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"dalle-pytorch cannot be imported ({e})")
    return dfp, dp


ADAPTER_MODELS = {
    "shift-rotary-mix": dict(depth=4, attn_types=("full", "axial_row", "axial_col", "conv_like"), shift_tokens=True,
                             rotary_emb=True),
    "reversible": dict(depth=2, reversible=True, attn_types=("full", "axial_row")),
    "shared-layers": dict(depth=2, shared_attn_ids=(0, 0), shared_ff_ids=(0, 0), attn_types=("full",)),
    "image-pos-emb": dict(depth=2, rotary_emb=False, attn_types=("full", "axial_col")),
}


def _adapter_model(name, device="cpu"):
    dfp, dp = _adapter()
    torch.manual_seed(0)
    vae = dp.DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    m = dp.DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, heads=2, dim_head=16,
                 **ADAPTER_MODELS[name]).eval()
    with torch.no_grad():  # sharper logits than the init, so that the draws depend on every layer
        m.to_logits[1].weight.mul_(4)
    return dfp, m.to(device)


@pytest.mark.parametrize("branch_ops", [True, False], ids=["branch-ops", "modules"])
@pytest.mark.parametrize("name", list(ADAPTER_MODELS))
def test_adapter_graph_mode_codes_equal_eager(name, branch_ops, graph_on_cpu, monkeypatch):
    """The adapter's device-position step (token shift from the history, image position and rotary
    embeddings indexed with ``pos`` on the device) replayed at every position: the codes of the eager
    step, which runs the branch ops (CPU float32) or, as on CUDA, the modules at the host position."""
    dfp, m = _adapter_model(name)
    monkeypatch.setattr(dfp, "resolve_cuda_graph", lambda cuda_graph, device, sparse=True: bool(cuda_graph))
    if not branch_ops:
        monkeypatch.setattr(dfp._StepModel, "_branches", lambda self: None)
    text = torch.randint(1, 44, (3, 6), generator=torch.Generator().manual_seed(1))
    text[0, 4:] = 0
    kw = dict(filter_thres=0.6, temperature=0.9, cond_scale=2.5, seed=3, compile=False)
    eager = dfp.generate(m, text, cuda_graph=False, **kw)
    graphed = dfp.generate(m, text, cuda_graph=True, **kw)
    assert graph_on_cpu.count("capture") == 1 and graph_on_cpu.count("replay") == m.image_seq_len - 2
    assert torch.equal(graphed, eager) and len(set(eager.flatten().tolist())) > 4


def test_adapter_graph_mode_with_image_priming(graph_on_cpu, monkeypatch):
    dfp, m = _adapter_model("shift-rotary-mix")
    monkeypatch.setattr(dfp, "resolve_cuda_graph", lambda cuda_graph, device, sparse=True: bool(cuda_graph))
    text = torch.randint(1, 44, (2, 6), generator=torch.Generator().manual_seed(2))
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(filter_thres=0.5, seed=4, img=img, num_init_img_tokens=6, compile=False)
    graphed = dfp.generate(m, text, cuda_graph=True, **kw)
    assert torch.equal(graphed[:, :6], m.vae.get_codebook_indices(img)[:, :6])
    assert torch.equal(graphed, dfp.generate(m, text, cuda_graph=False, **kw))


def test_adapter_cuda_graph_argument_checks():
    dfp, m = _adapter_model("shared-layers")
    text = torch.randint(1, 44, (1, 6))
    with pytest.raises(ValueError, match="cuda_graph: the decode step is captured on CUDA only"):
        dfp.generate(m, text, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or None"):
        dfp.generate(m, text, cuda_graph="yes")
    assert dfp.generate(m, text, cuda_graph=False, seed=0).shape == (1, m.image_seq_len)


# -- the real capture ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("opts", [dict(temperature=0.8, top_k=6), dict(cfg_scale=3.0, top_p=0.9)])
def test_cuda_graph_codes_equal_the_uncaptured_step(model, opts):
    """The captured step replayed at every position: the codes of the same step run without the graph
    (the same kernels on the same inputs), fresh codes for other seeds, and the CPU model's logits
    along the CUDA codes (teacher forcing; float32, TF32 off)."""
    m = copy.deepcopy(model).cuda()
    text = _text(1).cuda()
    graphed = generate_codes(m, text, 3, seed=5, **opts)  # the default on CUDA: captured
    assert torch.equal(graphed, generate_codes(m, text, 3, seed=5, cuda_graph=True, **opts))
    assert torch.equal(graphed, generate_codes(m, text, 3, seed=5, cuda_graph=False, **opts))
    other = generate_codes(m, text, 3, seed=6, **opts)
    assert not torch.equal(other, graphed)
    assert torch.equal(other, generate_codes(m, text, 3, seed=6, cuda_graph=False, **opts))
    guided = opts.get("cfg_scale", 1.0) != 1.0
    codes = graphed.flatten(0, 1).view(-1, 4, 4)
    rows = text.repeat_interleave(3, 0)
    on_cuda = teacher_forced_logits(m, rows, codes, guided=guided).cpu()
    on_cpu = teacher_forced_logits(model, rows.cpu(), codes.cpu(), guided=guided)
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_with_priming(model):
    m = copy.deepcopy(model).cuda()
    text, prime = _text(2).cuda(), _text(3, (2, 5), 24).cuda()
    opts = dict(temperature=0.8, top_k=6, seed=9, prime=prime, cfg_scale=1.5)
    graphed = generate_codes(m, text, 3, cuda_graph=True, **opts)
    assert torch.equal(graphed.flatten(2)[:, :, :5], prime[:, None].expand(-1, 3, -1))
    assert torch.equal(graphed, generate_codes(m, text, 3, cuda_graph=False, **opts))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(ADAPTER_MODELS))
def test_adapter_cuda_graph_codes_equal_the_uncaptured_step(name):
    dfp, m = _adapter_model(name, "cuda")
    text = torch.randint(1, 44, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(filter_thres=0.6, temperature=0.9, cond_scale=2.5, seed=3)
    graphed = dfp.generate(m, text, **kw)  # the default on CUDA: captured
    assert torch.equal(graphed, dfp.generate(m, text, cuda_graph=False, **kw))
    assert len(set(graphed.flatten().tolist())) > 4
