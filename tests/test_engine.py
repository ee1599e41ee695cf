"""The generation engine (dalle_fast.engine) and the step API: prefill + one decode step per position
equals the full forward, for the native DALLE and the DALLE-pytorch adapter; both generate through
the same Engine; the training forward checks token ids without a host sync off the CPU."""
import pytest
import torch

import dalle_fast.engine as engine_mod
from dalle_fast.engine import Engine, KVCache, SampleOptions
from dalle_fast.generate import generate_codes
from conftest import micro_dalle

torch.set_num_threads(1)


def _dalle_pytorch():
    """(the adapter module, the dalle_pytorch package), or skip."""
    import dalle_fast.integrations.dalle_pytorch as dp
    try:
        return dp, dp.import_dalle_pytorch(stand_ins=True)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"dalle-pytorch cannot be imported ({e})")


@pytest.fixture(scope="module")
def model():
    return micro_dalle()


@pytest.mark.parametrize("dense", [False, True])
def test_prefill_and_decode_steps_equal_the_full_forward(model, dense):
    """2 prompts x 3 candidates (shared text caches through prompt_index): the prefill's logits and
    each decode step's equal model.logits of the row's prompt and codes."""
    torch.manual_seed(3)
    text, codes = torch.randint(0, 35, (2, 4)), torch.randint(0, 24, (6, 16))
    prompt_index = torch.arange(2).repeat_interleave(3)
    with torch.no_grad():
        full = model.logits(text[prompt_index], codes[:, :-1])[:, 4:, 40:]  # (6, 16, 24)
        model.setup_caches(prompt_index, dense=dense)
        try:
            first = model.prefill(text)
            assert first.shape == (2, 24) and isinstance(model.caches[0], KVCache)
            got = [first[prompt_index]]
            pos = torch.tensor(5)
            for m in range(15):
                got.append(model.decode_step(codes[:, m], pos, 5 + m))
                pos += 1
        finally:
            model.clear_caches()
    assert model.caches is None
    torch.testing.assert_close(torch.stack(got, 1), full, rtol=1e-4, atol=1e-4)


def test_decode_step_needs_caches(model):
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.decode_step(torch.zeros(1, dtype=torch.long), torch.tensor(5), 5)


@torch.no_grad()
def test_engine_rows_and_guidance(model):
    """P prompts + the null prompt -> P*N conditional rows, then P*N unconditional ones reading the null prompt."""
    text = torch.randint(0, 35, (2, 4))
    eng = Engine(model, torch.cat([text, model.null_text(1)]), 3, text_len=5,
                 seeds=torch.arange(6), opts=SampleOptions(2.0, 1.0, 0, 1.0), guided=True)
    try:
        assert eng.rows == 6
        assert eng.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
        assert eng.first_logits.shape == (12, 24)
        codes = eng.decode(16)
    finally:
        eng.close()
    assert codes.shape == (6, 16) and model.caches is None
    assert torch.equal(codes.view(2, 3, 4, 4), generate_codes(model, text, 3, cfg_scale=2.0))


def test_native_and_adapter_generate_through_the_engine(model, monkeypatch):
    dp, dalle_pytorch = _dalle_pytorch()
    stepped = []
    real = Engine.run_step

    def run_step(self, draw_next=True):
        stepped.append(type(self.model).__name__)
        return real(self, draw_next)

    monkeypatch.setattr(engine_mod.Engine, "run_step", run_step)
    generate_codes(model, torch.randint(0, 35, (1, 4)), 2)
    assert stepped == ["DALLE"] * 15
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    peer = dalle_pytorch.DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=2, heads=2, dim_head=16,
                               attn_types=("full", "conv_like")).eval()
    stepped.clear()
    dp.generate(peer, torch.randint(1, 44, (2, 6)))
    assert stepped == ["_StepModel"] * 15


def test_adapter_step_model_equals_the_peer_forward():
    """The adapter's step-API object (shift tokens, rotary): prefill + decode steps equal
    DALLE-pytorch's own forward logits over the image vocabulary."""
    dp, dalle_pytorch = _dalle_pytorch()
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    peer = dalle_pytorch.DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=4, heads=2, dim_head=16,
                               attn_types=("full", "axial_row", "axial_col", "conv_like"), shift_tokens=True,
                               rotary_emb=True).eval()
    text, image = torch.randint(1, 44, (2, 6)), torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        full = peer(text, image)[:, 6:, peer.num_text_tokens:].float()  # positions T-1 .. T+S*S-2, image columns
        step = dp._StepModel(peer, dp._inspect(peer))
        step.setup_caches(torch.arange(2))
        got = [step.prefill(dp._text_ids(peer, text))]
        pos = torch.tensor(7)
        for m in range(15):
            got.append(step.decode_step(image[:, m], pos, 7 + m))
            pos += 1
        step.clear_caches()
    torch.testing.assert_close(torch.stack(got, 1), full, rtol=1e-4, atol=1e-4)


def test_training_forward_checks_ids_without_a_host_sync_off_the_cpu(model, monkeypatch):
    """check_text/flat_codes with sync=False (the training forward) read no values of a non-CPU
    tensor on the host: a device-side assertion checks them. On the CPU the ValueError stays."""
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append(msg))
    meta = torch.zeros(2, 4, dtype=torch.long, device="meta")  # no values: a host read would raise
    model.check_text(meta, sync=False)
    model.flat_codes(torch.zeros(2, 4, 4, dtype=torch.long, device="meta"), sync=False)
    assert asserted == ["text ids must lie in [0, text_vocab=40)", "codes must lie in [0, image_vocab=24)"]
    with pytest.raises(RuntimeError):  # the default (sync=True) reads them on the host
        model.check_text(meta)
    with pytest.raises(ValueError, match="text ids"):
        model(torch.full((1, 4), 40), torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 16), 24))
