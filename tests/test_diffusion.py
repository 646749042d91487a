"""The training objective: what the UNet is taught to predict follows the scheduler's config."""

import pytest
import torch
from diffusers import DDIMScheduler

from engine.training.objective import diffusion_loss, prediction_target
from engine.models.presets import SCHEDULER_CONFIG


def scheduler(kind: str) -> DDIMScheduler:
    return DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": kind})


def test_targets_by_prediction_type():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(prediction_target(scheduler("epsilon"), x0, noise, t), noise)
    abar = torch.tensor([scheduler("epsilon").alphas_cumprod[i].item() for i in t])[:, None, None, None]
    v = prediction_target(scheduler("v_prediction"), x0, noise, t)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    assert torch.cosine_similarity(v[2].flatten(), -x0[2].flatten(), dim=0) > 0.99  # noisiest step: v is about -x0
    with pytest.raises(ValueError, match="sample"):
        prediction_target(scheduler("sample"), x0, noise, t)


class Oracle(torch.nn.Module):
    """A "UNet" that answers the true noise or velocity, recovered from the clean latents it holds."""

    def __init__(self, x0, sched):
        super().__init__()
        self.x0, self.sched = x0, sched

    def forward(self, noisy, timesteps, encoder_hidden_states=None, **_):
        abar = self.sched.alphas_cumprod[timesteps][:, None, None, None]
        noise = (noisy - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        out = noise if self.sched.config.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * self.x0
        return type("Out", (), {"sample": out})()


class NoControl(torch.nn.Module):
    def forward(self, cond, timesteps, text, conditioning_scale=1.0, return_dict=False):
        return None, None


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_loss_is_zero_only_for_the_right_kind_of_answer(kind):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 2, 2, generator=g)
    right, wrong = scheduler(kind), scheduler("v_prediction" if kind == "epsilon" else "epsilon")
    loss = diffusion_loss(Oracle(x0, right), NoControl(), right, x0, None, None, torch.Generator().manual_seed(2))
    assert loss.item() < 1e-8
    # The same oracle judged as the other kind: far from zero.
    assert diffusion_loss(Oracle(x0, wrong), NoControl(), right, x0, None, None,
                          torch.Generator().manual_seed(2)).item() > 0.05
