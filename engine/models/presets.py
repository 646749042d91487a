"""Model shapes: ``sd15`` (Stable Diffusion 1.5), ``tiny`` (same block layout, tiny widths) and
``demo`` (same block layout, small widths, for the 64 x 64 demo world; see ``engine.demo.toy_sd``).

``tiny`` and ``demo`` need nothing from the network: their tokenizer is a CLIP-style byte-level BPE
built here from a short word list, so tests, smoke runs and the demo work offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRESETS = ("sd15", "tiny", "demo")

_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    use_linear_projection=False,
)

# The reference fixture's shape: model channels 32, multipliers 1,2,4,4, 2 heads, context 32.
_TINY_UNET = dict(_SD15_UNET, sample_size=16, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32,
                  attention_head_dim=2)

_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_TINY_VAE = dict(_SD15_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=128)

# The demo world's "toy SD": SD1.5's block types (so the Base ControlNet, adapters and the official
# key mapping apply unchanged) at widths that train on 2 CPU cores. Its VAE has three blocks, not
# four (4x downsampling): 64 x 64 scenes give 16 x 16 x 4 latents, the UNet's native size.
# ``scaling_factor`` is a placeholder until training measures it (engine.demo.toy_sd).
_DEMO_UNET = dict(_SD15_UNET, sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                  attention_head_dim=2)
_DEMO_VAE = dict(_SD15_VAE, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                 scaling_factor=1.0)

_SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
_DEMO_TEXT = dict(_TINY_TEXT, hidden_size=64, intermediate_size=256, num_hidden_layers=3, projection_dim=64)

# SD1.5's schedule: 1000 steps, scaled_linear betas 0.00085 -> 0.012.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters.
_TINY_WORDS = (
    "a an the of on in at and with above below left right beside over under near top bottom middle "
    "red green blue yellow orange purple pink white black gray brown cyan magenta "
    "circle square triangle star rectangle ring cross disk shape shapes background "
    "small large big tiny house tree dog cat car person photo image picture drawing"
).split()


def unet_config(preset: str) -> dict:
    return dict(_DEMO_UNET if preset == "demo" else _preset(preset, _SD15_UNET, _TINY_UNET))


def vae_config(preset: str) -> dict:
    return dict(_DEMO_VAE if preset == "demo" else _preset(preset, _SD15_VAE, _TINY_VAE))


def text_encoder_config(preset: str) -> dict:
    """``CLIPTextConfig`` arguments of a preset's text encoder (tiny: sized to its offline tokenizer)."""
    if preset == "tiny":
        tokenizer = build_tiny_tokenizer()
        return dict(_TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return dict(_preset(preset, _SD15_TEXT, _TINY_TEXT))


def _preset(preset: str, sd15: dict, tiny: dict) -> dict:
    if preset == "sd15":
        return sd15
    if preset == "tiny":
        return tiny
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def _byte_alphabet() -> list[str]:
    # Byte-level BPE's printable stand-ins for the 256 byte values (the GPT-2/CLIP convention).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_tokenizer():
    """A CLIP tokenizer with a small BPE vocabulary, made in code (no download)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right until the word is one token
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    # BPE applies the earliest merge first, so another word's merge can cut a word built above
    # ("cyan" -> "cy" + "an"). Join what is left with merges appended last: they only act where no
    # earlier merge does, and every piece they make is a prefix already in the vocabulary.
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for word in _TINY_WORDS:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest rank."""
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        i = next(i for i in range(len(pieces) - 1) if (pieces[i], pieces[i + 1]) == pair)
        pieces = pieces[:i] + [pair[0] + pair[1]] + pieces[i + 2:]
    return pieces


@dataclass
class SDComponents:
    """The frozen Stable Diffusion parts CtrLoRA runs on."""

    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler: object


def build_sd(preset: str, seed: int = 0) -> SDComponents:
    """Randomly initialised SD components of a preset (``sd15`` needs a real tokenizer: only the
    networks are built, and ``tokenizer`` is None; ``tiny`` and ``demo`` share the offline one)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(preset))
    vae = AutoencoderKL(**vae_config(preset))
    if preset in ("tiny", "demo"):
        tokenizer = build_tiny_tokenizer()
        text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **(_TINY_TEXT if preset == "tiny" else _DEMO_TEXT))
    else:
        tokenizer = None
        text_cfg = CLIPTextConfig(**_SD15_TEXT)
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler)
