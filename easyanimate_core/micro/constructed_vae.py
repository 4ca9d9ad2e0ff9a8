"""The micro VAE built by construction: a near-lossless pooling autoencoder written into the mag VAE's weights.

No training: every weight is set so the released V5.1 VAE graph (``MagvitVAE`` with ``model.VAE_CONFIG``)
computes a closed form, checked by ``closed_form_encode`` / ``closed_form_decode`` (tests/test_micro_vae.py).

Encoder: latent frame 0 is frame 0, latent k the mean of frames 4k-3..4k; in space each 8 x 8 block gives,
per colour, the Haar coefficients of its four 4 x 4 quadrant means: block mean, dx (left - right), dy
(top - bottom), dxy (diagonal) -- 12 of the 16 latent channels. Three more hold, per colour, the block mean of
frames 4k-1..4k minus that of frames 4k-3..4k-2: the motion inside the latent's 4 frames, so each latent frame
shows which way things move (an averaged frame alone shows only where, and the transformer would have to
compare frames to learn direction). The last channel is zero. Decoder: each block's mean colour, repeated over
its 8 x 8 pixels and its 4 frames (nearest in space and time).

How a VAE with GroupNorms and SiLUs computes a linear map:
- Every residual branch is switched off (its convs are zero), so the trunk is conv_in, the down/up
  samplers, the 1x1 shortcuts and the output convs: all linear. Convs use their current-frame tap only,
  except the stride-2 temporal downsamplers, which average the two frames of their window that are new.
- The only nonlinear steps left are the output GroupNorm + SiLU of encoder and decoder (per frame). Before
  them every signal v travels as a pair (+v, -v), so each group's mean is exactly 0, and each used group
  also holds a large constant pair (+c, -c) from a conv bias, which makes its standard deviation
  sigma = c * sqrt(2 / group size) up to a relative (sum of v^2) / c^2. The output conv takes the
  difference of each pair: silu(a) - silu(-a) = a exactly, times sigma.
- The spatial decoder does not interpolate: a 3 x 3 conv after a nearest upsample cannot tell the two
  sub-positions apart without mixing in the neighbour block, and at the frame edge that neighbour is zero
  padding (mid-gray: a bright false object on a dark background). The quadrant details are kept in the
  latents, where they tell the transformer where in its block an object edge lies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vae import MagvitVAE
from .model import vae_config

CONSTANT = 300.0  # the (+c, -c) channels: the relative error of the GroupNorm's sigma is ~ sum(v^2) / c^2 ~ 1e-4
LOGVAR = -30.0  # the smallest log-variance the VAE keeps (vae.encode clamps there): posterior samples = means
HAAR_KINDS = 4  # per colour: block mean, dx, dy, dxy
MOTION_LATENTS = 3  # per colour: the block mean of a latent's last two frames minus its first two
# The decoder reads only the block means. The details and motion channels, which are nonzero only around
# objects, are scaled up to about the means' spread (on palette clips: means std 0.3, details 0.01-0.07 and
# motion 0.025-0.05 before the gains), so that where an object is and how it moves weigh in the transformer's
# loss as much as the background colour does.
DETAIL_GAIN = 4.0
MOTION_GAIN = 6.0
USED_LATENTS = 3 * HAAR_KINDS + MOTION_LATENTS
CURRENT = 2  # a causal conv's time tap of the current frame (taps 0, 1 look back 2, 1 frames)


def _haar(q00, q01, q10, q11):
    """Haar coefficients (mean, dx, dy, dxy) of 2 x 2 quadrant values (row, column)."""
    return (
        (q00 + q01 + q10 + q11) / 4,
        (q00 + q10 - q01 - q11) / 4,
        (q00 + q01 - q10 - q11) / 4,
        (q00 - q01 - q10 + q11) / 4,
    )


def closed_form_encode(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4k+1, H, W] in [-1, 1] -> the constructed encoder's latent means [B, 16, k+1, H/8, W/8].

    Channels: 4 * colour + (mean, dx, dy, dxy); then 12 + colour: motion (0 for latent frame 0); 15: zero.
    """
    first, rest = video[:, :, :1], video[:, :, 1:]
    b, c, f, h, w = rest.shape
    halves = rest.reshape(b, c, f // 4, 2, 2, h, w).mean(4)  # [B, 3, T-1, 2, H, W]: each group's two frame pairs
    frames = torch.cat([first, halves.mean(3)], dim=2)  # [B, 3, T, H, W]
    quadrants = F.avg_pool3d(frames, (1, 4, 4))  # [B, 3, T, H/4, W/4]
    q00, q01 = quadrants[..., 0::2, 0::2], quadrants[..., 0::2, 1::2]
    q10, q11 = quadrants[..., 1::2, 0::2], quadrants[..., 1::2, 1::2]
    mean, *details = _haar(q00, q01, q10, q11)
    coefficients = torch.stack([mean, *(DETAIL_GAIN * d for d in details)], dim=2)  # [B, 3, 4, T, h, w]
    change = MOTION_GAIN * F.avg_pool3d(halves[:, :, :, 1] - halves[:, :, :, 0], (1, 8, 8))  # [B, 3, T-1, h, w]
    motion = torch.cat([torch.zeros_like(change[:, :, :1]), change], dim=2)
    spare = motion.new_zeros(b, 16 - USED_LATENTS, *motion.shape[2:])
    return torch.cat([coefficients.flatten(1, 2), motion, spare], dim=1)


def closed_form_decode(latents: torch.Tensor) -> torch.Tensor:
    """Latent means [B, 16, T, h, w] -> the constructed decoder's video [B, 3, 4T-3, 8h, 8w]."""
    means = latents[:, 0 : 3 * HAAR_KINDS : HAAR_KINDS]  # [B, 3, T, h, w]
    first = means[:, :, :1]
    rest = means[:, :, 1:].repeat_interleave(4, dim=2)
    return F.interpolate(torch.cat([first, rest], dim=2), scale_factor=(1, 8, 8), mode="nearest")


def _centre(weight: torch.Tensor, out: int, inp: int, value: float, time_tap: int = CURRENT) -> None:
    """Set the current-frame, centre spatial tap of a 3 x 3 x 3 conv from channel ``inp`` to ``out``."""
    weight[out, inp, time_tap, 1, 1] = value


def _pooling(weight: torch.Tensor, channel: int, time_average: bool) -> None:
    """A downsampler's 2 x 2 spatial mean of ``channel`` (taps 0-1: the window after its right/bottom pad)
    and, with ``time_average``, the mean of the two new frames of each stride-2 window (taps 1, 2)."""
    taps = (1, 2) if time_average else (CURRENT,)
    for t in taps:
        weight[channel, channel, t, 0:2, 0:2] = 0.25 / len(taps)


@torch.no_grad()
def constructed_state_dict() -> dict[str, torch.Tensor]:
    """The weights of the constructed micro VAE (float32), keyed like ``MagvitVAE``'s state dict."""
    config = vae_config()
    vae = MagvitVAE(config)
    state = {k: torch.zeros_like(v) for k, v in vae.state_dict().items()}
    for key, value in state.items():
        if key.endswith(("norm1.weight", "norm2.weight", "conv_norm_out.weight")):
            value.fill_(1.0)  # GroupNorm scales 1, shifts 0
    enc, dec = "encoder.", "decoder."

    # Encoder: RGB in channels 0-2 through conv_in, the two spatial means, the 32 -> 64 shortcut.
    for colour in range(3):
        _centre(state[enc + "conv_in.weight"], colour, colour, 1.0)
        _pooling(state[enc + "down_blocks.0.downsampler.conv.weight"], colour, time_average=False)
        state[enc + "down_blocks.1.convs.0.shortcut.weight"][colour, colour] = 1.0
        _pooling(state[enc + "down_blocks.1.downsampler.conv.weight"], colour, time_average=True)
    # The last downsampler (4 x 4 quadrant means -> 8 x 8 blocks) writes the Haar coefficients as pairs,
    # three per GroupNorm group of 8 channels, plus each group's constant pair.
    down = state[enc + "down_blocks.2.downsampler.conv.weight"]
    per_group = config.block_out_channels[-1] // config.norm_num_groups  # 8
    signals_per_group = (per_group - 2) // 2  # 3
    pairs = []  # (plus channel, minus channel) of each latent channel
    quadrant_taps = ((0, 0), (0, 1), (1, 0), (1, 1))
    for signal in range(USED_LATENTS):
        group, slot = divmod(signal, signals_per_group)
        plus = group * per_group + 2 * slot
        pairs.append((plus, plus + 1))
        if signal < 3 * HAAR_KINDS:  # Haar coefficient: the mean of the window's two new frames
            colour, kind = divmod(signal, HAAR_KINDS)
            signs = [(1, 1, 1, 1), (1, -1, 1, -1), (1, 1, -1, -1), (1, -1, -1, 1)][kind]  # q00, q01, q10, q11
            gain = DETAIL_GAIN if kind else 1.0
            time_weights = {1: gain / 8, 2: gain / 8}  # / 4 (Haar) / 2 (frame pair)
        else:  # motion: the later frame pair minus the earlier one (0 for frame 0, whose window repeats it)
            colour, signs = signal - 3 * HAAR_KINDS, (1, 1, 1, 1)
            time_weights = {1: -MOTION_GAIN / 4, 2: MOTION_GAIN / 4}
        for (row, col), sign in zip(quadrant_taps, signs, strict=True):
            for t, weight in time_weights.items():
                down[plus, colour, t, row, col] = sign * weight
                down[plus + 1, colour, t, row, col] = -sign * weight
    used_groups = -(-USED_LATENTS // signals_per_group)
    bias = state[enc + "down_blocks.2.downsampler.conv.bias"]
    for group in range(used_groups):
        bias[group * per_group + per_group - 2] = CONSTANT
        bias[group * per_group + per_group - 1] = -CONSTANT
    sigma = CONSTANT * (2 / per_group) ** 0.5  # std of a group of 8 holding (+c, -c) and zero-mean pairs
    for latent, (plus, minus) in enumerate(pairs):
        _centre(state[enc + "conv_out.weight"], latent, plus, sigma)
        _centre(state[enc + "conv_out.weight"], latent, minus, -sigma)
    latent_channels = config.latent_channels
    state[enc + "conv_out.bias"][latent_channels:] = LOGVAR
    state["quant_conv.weight"][:, :, 0, 0, 0] = torch.eye(2 * latent_channels)
    state["post_quant_conv.weight"][:, :, 0, 0, 0] = torch.eye(latent_channels)

    # Decoder: each colour's block mean in channels 0-2, nearest upsamplers (centre taps), then the 64 -> 32
    # shortcut writes (+m, -m, +c, -c) into GroupNorm groups 0-2 (4 channels each) for the output conv.
    dec_per_group = config.block_out_channels[0] // config.norm_num_groups  # 4
    dec_sigma = CONSTANT * (2 / dec_per_group) ** 0.5
    shortcut = state[dec + "up_blocks.3.convs.0.shortcut.weight"]
    shortcut_bias = state[dec + "up_blocks.3.convs.0.shortcut.bias"]
    for colour in range(3):
        _centre(state[dec + "conv_in.weight"], colour, colour * HAAR_KINDS, 1.0)
        for block in range(3):
            _centre(state[dec + f"up_blocks.{block}.upsampler.conv.weight"], colour, colour, 1.0)
        plus = colour * dec_per_group
        shortcut[plus, colour] = 1.0
        shortcut[plus + 1, colour] = -1.0
        shortcut_bias[plus + 2] = CONSTANT
        shortcut_bias[plus + 3] = -CONSTANT
        _centre(state[dec + "conv_out.weight"], colour, plus, dec_sigma)
        _centre(state[dec + "conv_out.weight"], colour, plus + 1, -dec_sigma)
    return state


def constructed_vae(dtype: torch.dtype = torch.float32) -> MagvitVAE:
    """The micro ``MagvitVAE`` with the constructed weights (scaling factor still the config's)."""
    vae = MagvitVAE(vae_config(), dtype=dtype)
    vae.load_state_dict(constructed_state_dict())
    return vae.eval()


def scaling_factor(clips: int = 32, seed: int = 12345) -> float:
    """1 / std of the latents of ``clips`` palette clips (the trained VAE's rule, on the closed form it equals).

    The clips are of the bounded world (``data.Clip.wrap`` False), the one the VAE was built in: the shipped
    transformer was trained on latents scaled by this factor."""
    from .train_vae import training_batch

    batches = [training_batch(seed, i, 1, 17, wrap=False) for i in range(clips)]
    return float(1.0 / torch.cat([closed_form_encode(batch) for batch in batches]).std())


def write_vae_folder(folder) -> None:
    """``folder`` (a model's ``vae/``): the constructed weights, VAE_CONFIG with the measured scaling factor."""
    from .model import VAE_CONFIG, save_model_folder

    config = {**VAE_CONFIG, "scaling_factor": round(scaling_factor(), 5)}
    save_model_folder(folder, constructed_state_dict(), config, torch.float32)
