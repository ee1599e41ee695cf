"""Convert OpenAI's released dVAE (PyPI ``dall-e``, module ``dall_e``) to :class:`DVAE`.

:class:`dalle_fast.models.dvae.DVAE` at ``group_count=4`` is architecturally identical to
``dall_e.Encoder``/``dall_e.Decoder`` (same module tree, residual gains, pixel mapping), so the
conversion renames the custom ``Conv2d`` parameters ``w``/``b`` to ``weight``/``bias``. The sizes
(``n_hid``, ``n_init``, ``n_blk_per_group``, ``vocab_size``, channels) are read off the weights.

Usage with the official checkpoints (pickled modules; loading them needs ``dall_e`` installed)::

    enc = dall_e.load_model("encoder.pkl"); dec = dall_e.load_model("decoder.pkl")
    dvae = from_openai(enc, dec)            # DVAE, image_size 256 -> 32x32 codes, K = 8192
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import nn

from .dvae import DVAE, DVAEConfig

OPENAI_GROUP_COUNT = 4  # the dall_e modules hard-code four groups


def _state_dict(module_or_sd: nn.Module | Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    if isinstance(module_or_sd, nn.Module):
        return dict(module_or_sd.state_dict())
    if isinstance(module_or_sd, Mapping):
        return dict(module_or_sd)
    raise ValueError(f"{name} must be an nn.Module or a state dict, got {type(module_or_sd).__name__}")


def rename_openai_keys(state_dict: Mapping[str, torch.Tensor], name: str = "state_dict") -> dict[str, torch.Tensor]:
    """``blocks.<...>.w`` / ``.b`` -> ``blocks.<...>.weight`` / ``.bias``; other keys are an error."""
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(blocks\..+)\.(w|b)", key)
        if m is None:
            raise ValueError(f"{name} has unexpected key {key!r}; expected dall_e Conv2d parameters 'blocks....w|b'")
        out[f"{m.group(1)}.{'weight' if m.group(2) == 'w' else 'bias'}"] = value.detach().float().clone()
    return out


def _blocks_per_group(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> int:
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"{name} has no 'blocks.group_1.block_N' parameters")
    return max(blocks)


def config_from_openai(encoder_sd: Mapping[str, torch.Tensor], decoder_sd: Mapping[str, torch.Tensor],
                       image_size: int = 256) -> DVAEConfig:
    """Read the dVAE sizes off OpenAI encoder/decoder state dicts (``w``/``b`` keys)."""
    try:
        enc_in = encoder_sd["blocks.input.w"]          # (n_hid, C, 7, 7)
        enc_out = encoder_sd["blocks.output.conv.w"]   # (K, 8 n_hid, 1, 1)
        dec_in = decoder_sd["blocks.input.w"]          # (n_init, K, 1, 1)
        dec_out = decoder_sd["blocks.output.conv.w"]   # (2 C, n_hid, 1, 1)
    except KeyError as err:
        raise ValueError(f"not a dall_e Encoder/Decoder state dict: missing {err.args[0]!r}") from None
    if dec_in.shape[1] != enc_out.shape[0]:
        raise ValueError(f"encoder vocab_size {enc_out.shape[0]} != decoder vocab_size {dec_in.shape[1]}")
    if dec_out.shape[0] != 2 * enc_in.shape[1]:
        raise ValueError(f"decoder outputs {dec_out.shape[0]} channels, expected 2 x {enc_in.shape[1]}")
    # DVAE shares n_hid and n_blk_per_group between encoder and decoder; dall_e sizes them separately
    if dec_out.shape[1] != enc_in.shape[0]:
        raise ValueError(f"decoder n_hid {dec_out.shape[1]} != encoder n_hid {enc_in.shape[0]}: DVAE needs one n_hid")
    enc_blocks, dec_blocks = _blocks_per_group(encoder_sd, "encoder"), _blocks_per_group(decoder_sd, "decoder")
    if enc_blocks != dec_blocks:
        raise ValueError(f"decoder n_blk_per_group {dec_blocks} != encoder n_blk_per_group {enc_blocks}: "
                         "DVAE needs one n_blk_per_group")
    return DVAEConfig(image_size=image_size, channels=enc_in.shape[1], vocab_size=enc_out.shape[0],
                      n_hid=enc_in.shape[0], n_init=dec_in.shape[0], n_blk_per_group=enc_blocks,
                      group_count=OPENAI_GROUP_COUNT)


def from_openai(encoder: nn.Module | Mapping[str, torch.Tensor], decoder: nn.Module | Mapping[str, torch.Tensor],
                image_size: int = 256, **config_overrides) -> DVAE:
    """Build a :class:`DVAE` carrying the weights of ``dall_e`` ``encoder`` and ``decoder``
    (modules or their state dicts). ``DVAE.logits(x)`` equals ``encoder(map_pixels(x))`` and
    ``DVAE.decoder(z)`` equals ``decoder(z)`` in float32. ``config_overrides`` replace training
    fields (schedule, likelihood); the sizes are read off the weights and cannot be overridden."""
    enc_sd, dec_sd = _state_dict(encoder, "encoder"), _state_dict(decoder, "decoder")
    cfg = config_from_openai(enc_sd, dec_sd, image_size)
    fixed = sorted(set(config_overrides) & _SIZE_FIELDS)
    if fixed:
        raise ValueError(f"config_overrides cannot change {fixed}: they are read off the weights")
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    model = DVAE(cfg)
    for name, module, sd in (("encoder", model.encoder, enc_sd), ("decoder", model.decoder, dec_sd)):
        try:
            module.load_state_dict(rename_openai_keys(sd, name))
        except RuntimeError as err:  # missing / unexpected / mis-sized parameters
            raise ValueError(f"{name} does not fit a dall_e {name} of the sizes {cfg}: {err}") from None
    return model


# DVAEConfig fields that :func:`config_from_openai` reads off the weights (image_size is an argument)
_SIZE_FIELDS = frozenset({"channels", "vocab_size", "n_hid", "n_init", "n_blk_per_group", "group_count"})
