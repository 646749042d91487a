"""The reference implementation's outputs, reproduced through our import of its files."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from engine.models import adapters
from engine.formats.official import convert_ldm_unet, convert_official_adapter, convert_official_base
from engine.formats.tensors import load_tensor_file
from engine.models.controlnet import BaseControlNetModel
from engine.models.presets import unet_config

RESIDUAL_TOL = 2e-4  # SDPA rounds differently from the reference's einsum attention; a wrong eps is ~3e-4
EPS_TOL = 1e-5


@pytest.fixture(scope="module")
def loaded(ref_tiny):
    ucfg = unet_config("tiny")
    cfg = BaseControlNetModel.config_from_unet(ucfg)
    base, _ = convert_official_base(load_tensor_file(ref_tiny / "base.ckpt"), cfg)
    controlnet = BaseControlNetModel(**cfg).eval()
    controlnet.load_state_dict(base)
    adapters.load_adapter(controlnet, "c0", convert_official_adapter(load_tensor_file(ref_tiny / "adapter_cond0.ckpt"), cfg))
    adapters.load_adapter(controlnet, "c1",
                          convert_official_adapter(load_tensor_file(ref_tiny / "adapter_cond1.safetensors"), cfg))
    unet = UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(convert_ldm_unet(load_tensor_file(ref_tiny / "unet_ldm.safetensors"), ucfg))
    ref = load_file(str(ref_tiny / "reference_outputs.safetensors"))
    return controlnet, unet, ref


def _residuals(out):
    return list(out.down_block_res_samples) + [out.mid_block_res_sample]


def _eps(unet, ref, res):
    with torch.no_grad():
        if res is None:
            return unet(ref["inputs.x"], ref["inputs.timesteps"], ref["inputs.context"]).sample
        return unet(ref["inputs.x"], ref["inputs.timesteps"], ref["inputs.context"],
                    down_block_additional_residuals=res[:-1], mid_block_additional_residual=res[-1]).sample


def _max_err(ours, ref, prefix):
    return max((a - ref[f"{prefix}.{i:02d}"]).abs().max().item() for i, a in enumerate(ours))


@pytest.mark.parametrize("index", [0, 1])
def test_single_adapter(loaded, index):
    controlnet, unet, ref = loaded
    with torch.no_grad(), controlnet.routing.use(f"c{index}"):
        res = _residuals(controlnet(ref[f"inputs.hint{index}"], ref["inputs.timesteps"], ref["inputs.context"]))
    assert max(r.abs().max().item() for r in res) > 10  # the tolerance is relative to values this large
    assert _max_err(res, ref, f"control.lora{index}") < RESIDUAL_TOL
    assert (_eps(unet, ref, res) - ref[f"eps.lora{index}"]).abs().max().item() < EPS_TOL


def test_weighted_sum_and_mixed_batch(loaded):
    controlnet, unet, ref = loaded
    t, ctx = ref["inputs.timesteps"], ref["inputs.context"]
    with torch.no_grad(), controlnet.routing.use([("c0", 2), ("c1", 2)]):
        # both conditions in ONE forward, each on its own slice of the batch
        res = _residuals(controlnet(torch.cat([ref["inputs.hint0"], ref["inputs.hint1"]]), torch.cat([t, t]),
                                    torch.cat([ctx, ctx])))
    assert _max_err([r[:2] for r in res], ref, "control.lora0") < RESIDUAL_TOL
    assert _max_err([r[2:] for r in res], ref, "control.lora1") < RESIDUAL_TOL
    weighted = [1.0 * r[:2] + 0.6 * r[2:] for r in res]
    assert _max_err(weighted, ref, "control.weighted") < RESIDUAL_TOL
    assert (_eps(unet, ref, weighted) - ref["eps.weighted"]).abs().max().item() < EPS_TOL
    assert (_eps(unet, ref, None) - ref["eps.nocontrol"]).abs().max().item() < EPS_TOL


def test_fused_adapter_matches(loaded):
    controlnet, _, ref = loaded
    args = (ref["inputs.hint0"], ref["inputs.timesteps"], ref["inputs.context"])
    with torch.no_grad(), controlnet.routing.use("c0"):
        adapters.fuse_adapter(controlnet, "c0")
        try:
            fused = _residuals(controlnet(*args))
        finally:
            adapters.unfuse_adapters(controlnet)
    assert _max_err(fused, ref, "control.lora0") < RESIDUAL_TOL


def test_wrong_norm_eps_is_caught(loaded):
    """The tolerance is tight enough to see a wrong transformer GroupNorm eps (1e-5 for 1e-6)."""
    controlnet, _, ref = loaded
    norms = [m for n, m in controlnet.named_modules() if n.endswith("attentions.0.norm")]
    for m in norms:
        m.eps = 1e-5
    try:
        with torch.no_grad(), controlnet.routing.use("c0"):
            res = _residuals(controlnet(ref["inputs.hint0"], ref["inputs.timesteps"], ref["inputs.context"]))
    finally:
        for m in norms:
            m.eps = 1e-6
    assert _max_err(res, ref, "control.lora0") > RESIDUAL_TOL
