"""Nothing lost: damaged checkpoints are passed over (and kept, renamed), a killed writer's temporary
files are cleaned, every load failure is a ValueError naming the file, and resuming says what it did."""
import hashlib
import json
import os

import pytest
import torch

from dalle_fast import checkpoint as ck
from dalle_fast.cli import main
from dalle_fast.data.shapes import ShapesDataset
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.train import TrainConfig, Trainer, dvae_loss, image_collate

torch.set_num_threads(1)
MICRO = DVAEConfig(image_size=16, vocab_size=64, n_hid=16, n_init=16, n_blk_per_group=1, group_count=2,
                   tau_anneal_steps=20, kl_warmup_steps=5)


def micro_trainer(out_dir, steps, **kw):
    torch.manual_seed(123)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=kw.pop("every", 2),
                      progress=False, seed=7, log_every=1, **kw)
    return Trainer(DVAE(MICRO), dvae_loss, ShapesDataset(size=16, length=10, seed=1), cfg, out_dir,
                   collate_fn=image_collate, model_type="dvae", model_config=MICRO, device="cpu")


class Stop(Exception):
    pass


def interrupted_run(out_dir, stop_at, steps=8):
    """A run of ``steps`` steps that stops (like a killed process) when step ``stop_at`` begins."""
    t = micro_trainer(out_dir, steps)

    def loss(model, batch, step):
        if step == stop_at:
            raise Stop
        return dvae_loss(model, batch, step)

    t.loss_fn = loss
    with pytest.raises(Stop):
        t.fit()


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_checkpoint(tmp_path, **meta_changes):
    path = ck.save_checkpoint(tmp_path, 3, torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    meta = json.loads(path.read_text())
    meta.update(meta_changes)
    path.write_text(json.dumps(meta))
    return path


def test_invalid_safetensors_header_with_a_valid_hash_is_a_value_error(tmp_path):
    """A weights file whose hash matches but whose header is not safetensors escaped as a raw
    SafetensorError traceback."""
    path = write_checkpoint(tmp_path)
    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    (tmp_path / "checkpoint-00000003.safetensors").write_bytes(blob)
    write_checkpoint(tmp_path, weights_sha256=hashlib.sha256(blob).hexdigest())
    (tmp_path / "checkpoint-00000003.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.safetensors.*not a valid safetensors file"):
        ck.load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint-00000003"):
        ck.load_model(path)


@pytest.mark.parametrize("field,value", [("step", "three"), ("step", -1), ("step", True), ("weights", "../elsewhere"),
                                         ("weights", 5), ("weights_sha256", None), ("model_type", 7),
                                         ("optimizer", {"state": {}}), ("optimizer", [1, 2]), ("rng", "x"),
                                         ("extra", []), ("model_config", "x")])
def test_malformed_checkpoint_fields_are_value_errors_naming_the_file(tmp_path, field, value):
    path = write_checkpoint(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.json"):
        ck.load_checkpoint(path)


def test_malformed_optimizer_state_is_a_value_error_naming_the_file(tmp_path):
    path = write_checkpoint(tmp_path, optimizer={"param_groups": [{"params": [0, 1]}], "state": {"x": {"step": 1}}})
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.json"):
        ck.load_checkpoint(path)
