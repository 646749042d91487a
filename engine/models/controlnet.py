"""The Base ControlNet: SD1.5's UNet encoder + middle block driven by a condition latent.

Differs from diffusers' ``ControlNetModel`` in the ways CtrLoRA needs: there is no hint network
(the condition arrives as a VAE latent), and ``conv_in`` sees that latent only, never the noisy
sample. Key names follow ``ControlNetModel`` so that diffusers' tooling and ours agree.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

from engine.models.adapters import RoutedConv2d, install_routed_layers
from engine.models.routing import AdapterRouting


@dataclass
class BaseControlNetOutput(BaseOutput):
    """The 12 down-block residuals (encoder order) and the middle-block residual."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class BaseControlNetModel(ModelMixin, ConfigMixin):
    """CtrLoRA's shared Base ControlNet (config mirrors ``UNet2DConditionModel``'s encoder half)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        attention_head_dim: int | tuple[int, ...] = 8,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        # Which adapter each slice of the batch uses; read by the adapter layers (engine.models.adapters).
        self.routing = AdapterRouting()
        # diffusers' SD1.5 configs store the head COUNT in attention_head_dim.
        heads = attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(down_block_types)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([self._zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel = output_channel
            output_channel = block_out_channels[i]
            is_final = i == len(block_out_channels) - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=1,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=output_channel // heads[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                )
            )
            for _ in range(layers_per_block + (0 if is_final else 1)):
                self.controlnet_down_blocks.append(self._zero_conv(output_channel))

        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = self._zero_conv(block_out_channels[-1])
        install_routed_layers(self, self.routing)

    def _zero_conv(self, channels: int) -> RoutedConv2d:
        return RoutedConv2d(channels, self.routing)

    @staticmethod
    def config_from_unet(unet_config) -> dict:
        """This model's config from a ``UNet2DConditionModel`` config (a dict or FrozenDict)."""
        c = dict(unet_config)
        params = inspect.signature(BaseControlNetModel.__init__).parameters
        return {k: c.get(k, p.default) for k, p in params.items() if k != "self"}

    @classmethod
    def from_unet(cls, unet, load_weights: bool = True) -> "BaseControlNetModel":
        """Build from a ``UNet2DConditionModel`` and copy its encoder and middle block (the
        paper's initialisation of a new base)."""
        model = cls(**cls.config_from_unet(unet.config))
        if load_weights:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                getattr(model, name).load_state_dict(getattr(unet, name).state_dict())
        return model.to(device=unet.device) if model.dtype == unet.dtype else model.to(unet.device, unet.dtype)

    def forward(
        self,
        cond_latent: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditioning_scale: float | list[float] = 1.0,
        return_dict: bool = True,
    ) -> BaseControlNetOutput | tuple:
        """Residuals for the frozen UNet from a condition latent (the noisy sample is never seen).

        The adapter in use is set through ``engine.models.adapters.use_adapters`` (one name, or one name
        per contiguous slice of the batch); with none, the base's own zero convs and norms act.
        """
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=cond_latent.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.to(cond_latent.device).expand(cond_latent.shape[0])
        t_emb = self.time_proj(timesteps).to(dtype=cond_latent.dtype)
        emb = self.time_embedding(t_emb)

        sample = self.conv_in(cond_latent)
        down_res = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            down_res += res
        sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)

        scales = conditioning_scale
        if not isinstance(scales, (list, tuple)):
            scales = [scales] * (len(down_res) + 1)
        down_out = tuple(conv(r) * s for conv, r, s in zip(self.controlnet_down_blocks, down_res, scales))
        mid_out = self.controlnet_mid_block(sample) * scales[-1]
        if not return_dict:
            return down_out, mid_out
        return BaseControlNetOutput(down_block_res_samples=down_out, mid_block_res_sample=mid_out)

