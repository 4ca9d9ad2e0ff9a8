"""The VAE trainer's loss terms: reconstruction, KL, outlier penalty, the discriminators, a perceptual distance.

They follow the official ``LPIPSWithDiscriminator`` (easyanimate/vae/ldm/modules/losses/contperceptual.py) and its
mag-v2 settings (configs/autoencoder/autoencoder_kl_32x32x4_mag_v2.yaml), with the official reductions, so that
the official weights keep their meaning:

* reconstruction: ``l1 |x - x'| + l2 (x - x')^2`` (+ ``perceptual_weight`` x the perceptual distance, added to
  every pixel of its frame), summed over each frame's pixels and averaged over frames;
* KL of the posterior to N(0, 1): summed over a clip's latents, averaged over clips, times ``kl_weight`` (1e-6);
* outlier penalty: how far posterior means stray beyond ``r`` standard deviations of their frame's channel
  (r = 3), per pixel, averaged, times 1e5;
* adversarial (from ``disc_start``): a PatchGAN on frames and a 3-D discriminator on clips, trained from scratch
  with the hinge loss; the generator term ``-mean(logits)`` is weighted adaptively (``adaptive_weight``).

The official learnable ``logvar`` of the NLL is left out: it is in no optimizer there, so it stays 0 and the
NLL equals the reconstruction loss. LPIPS needs weights we cannot download at run time; the perceptual term here
compares the hidden states of a local transformers image model instead (``PerceptualDistance``), only when given.

Every per-sample function returns [B] so that a distributed run can sum its samples and divide by the global
batch (a process's share of a mean over the global batch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATOR_KINDS = ("both", "2d", "3d")
GROUP_NORM_GROUPS = 32  # the official 3-D discriminator's GroupNorm(32, channels)
ADAPTIVE_WEIGHT_EPS = 1e-4  # official calculate_adaptive_weight: ||grad nll|| / (||grad g|| + 1e-4)
ADAPTIVE_WEIGHT_MAX = 1e4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Reconstruction, KL, outlier penalty (per sample)
# --------------------------------------------------------------------------------------------------


def reconstruction_per_sample(
    video: torch.Tensor, recon: torch.Tensor, l1_weight: float, l2_weight: float, perceptual: torch.Tensor | None
) -> torch.Tensor:
    """[B]: per frame, the sum over its pixels of l1 |d| + l2 d^2 (+ the frame's perceptual distance at every
    pixel), averaged over the clip's frames. ``video``, ``recon`` [B, 3, F, H, W]; ``perceptual`` [B, F] or None."""
    diff = recon.float() - video.float()
    per_pixel = l1_weight * diff.abs() + l2_weight * diff.square() if l2_weight else l1_weight * diff.abs()
    b, c, f, h, w = video.shape
    per_frame = per_pixel.sum(dim=(1, 3, 4))  # [B, F]
    if perceptual is not None:
        per_frame = per_frame + perceptual.float() * (c * h * w)  # official: p_loss broadcast onto every pixel
    return per_frame.mean(1)


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """[B]: KL(N(mean, exp(logvar)) || N(0, 1)) summed over a clip's latents [B, L, T, h, w]."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def outlier_penalty_per_sample(mean: torch.Tensor, r: float) -> torch.Tensor:
    """[B]: the official outlier penalty of posterior means [B, L, T, h, w]: per channel and frame, the mean over
    pixels of max(|x - mean| - r std, 0) (mean and unbiased std over the frame's pixels), averaged."""
    mean = mean.float()
    centre = mean.mean(dim=(3, 4), keepdim=True)
    spread = mean.std(dim=(3, 4), keepdim=True)
    penalty = (mean - centre).abs().sub(r * spread).clamp(min=0)
    return penalty.mean(dim=(3, 4)).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------


class FrameDiscriminator(nn.Module):
    """PatchGAN on single frames (taming's NLayerDiscriminator, as the official loss uses): [N, 3, H, W] ->
    logits [N, 1, H / 2^layers - 2, W / 2^layers - 2]."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        stack: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last one keeps the size (pix2pix's 70x70 receptive field)
            stack += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out)]
            stack.append(nn.LeakyReLU(0.2))
            width = out
        stack.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*stack)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(frames)


def frame_logits_side(size: int, layers: int) -> int:
    """Side of the PatchGAN's logit map for frames of side ``size`` (< 1: the frames are too small)."""
    for _ in range(layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2  # two kernel-4, stride-1 convs


class BlurDown3D(nn.Module):
    """Depthwise [1, 2, 1]^3 blur with stride 2 in time and space (the official BlurPooling3D)."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, 3, 3, 3).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B, C, ceil(T/2), ...]
        return F.conv3d(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=self.channels)


class ClipDiscriminatorBlock(nn.Module):
    """GroupNorm-LeakyReLU-conv twice (blur-downsampled in between) plus a shortcut, scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, downsample: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUP_NORM_GROUPS, cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUP_NORM_GROUPS, cout)
        self.down = BlurDown3D(cout) if downsample else nn.Identity()
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.shortcut = nn.Sequential(*([BlurDown3D(cin)] if downsample else []), nn.Conv3d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        h = self.conv2(self.down(F.leaky_relu(self.norm2(h), 0.2)))
        return (h + self.shortcut(x)) / math.sqrt(2)


class ClipDiscriminator(nn.Module):
    """The official Discriminator3D on whole clips: [B, 3, F, H, W] -> logits [B, 1, t, h, w]."""

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256), in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, stride=2, padding=1)
        widths = [channels[0], *channels]
        self.blocks = nn.Sequential(
            *(
                ClipDiscriminatorBlock(widths[i], widths[i + 1], downsample=i < len(channels) - 1)
                for i in range(len(channels))
            )
        )
        self.conv_out = nn.Conv3d(channels[-1], 1, 3, padding=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(self.conv_in(video)))


def init_discriminator_weights(module: nn.Module) -> None:
    """taming's weights_init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Discriminators(nn.Module):
    """The frame PatchGAN and / or the clip discriminator; ``forward(real, fake)`` gives both's logits (one call,
    so that DDP sees one forward per backward; real and fake go through separately, as the official, so each gets
    its own BatchNorm statistics)."""

    def __init__(self, kind: str = "both", channels: int = 64, frame_layers: int = 3):
        super().__init__()
        self.frames = FrameDiscriminator(channels, frame_layers) if kind in ("both", "2d") else None
        self.clips = ClipDiscriminator((channels, 2 * channels, 4 * channels)) if kind in ("both", "3d") else None
        init_discriminator_weights(self)

    def logits(self, video: torch.Tensor) -> list[torch.Tensor]:
        """Each discriminator's logits for clips [B, 3, F, H, W] (the frame one sees the B*F frames)."""
        out = []
        if self.frames is not None:
            out.append(self.frames(video.transpose(1, 2).flatten(0, 1)))
        if self.clips is not None:
            out.append(self.clips(video))
        return out

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.logits(real), self.logits(fake)


def hinge_discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Summed over the discriminators: 0.5 (mean relu(1 - real) + mean relu(1 + fake))."""
    pairs = zip(real, fake, strict=True)
    return sum(0.5 * (F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()) for r, f in pairs)


def generator_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """The adversarial term of the VAE: -mean(logits) of its reconstructions, summed over the discriminators."""
    return -sum(f.float().mean() for f in fake)


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> float:
    """disc_weight x ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4] (gradients at the decoder's last layer:
    the adversarial term then pulls about as hard as the reconstruction)."""
    ratio = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return float(ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX)) * disc_weight


# --------------------------------------------------------------------------------------------------
# Perceptual distance from a local image model
# --------------------------------------------------------------------------------------------------


def check_perceptual_model(flag: str, folder: str | Path) -> Path:
    """``folder`` is a local transformers image model (config.json and safetensors weights) that AutoModel builds;
    ValueError naming ``flag`` and the fix. Reads the config only, no weight."""
    from transformers import AutoConfig

    path = Path(folder).expanduser()
    fix = (
        "give a local folder of a transformers image model (config.json + .safetensors), e.g. one saved with "
        "save_pretrained; nothing is downloaded"
    )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{flag} {folder}: no config.json there; {fix}")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{flag} {folder}: no .safetensors weights there (pickle files are not read); {fix}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{flag} {folder}: transformers cannot read its config.json ({e}); {fix}") from e
    vision = getattr(config, "vision_config", config)
    if getattr(vision, "num_channels", 3) != 3:
        raise ValueError(f"{flag} {folder}: the model takes {vision.num_channels} channels, not RGB; {fix}")
    return path


class PerceptualDistance(nn.Module):
    """An LPIPS-like distance between frames from a frozen local image model: its hidden states of both frames,
    unit-normalised over channels, squared differences summed over channels and averaged over positions and
    layers. Frames are resized to the model's ``image_size`` (when it has one) and normalised with its
    preprocessor's mean and std (ImageNet's when it has no preprocessor_config.json)."""

    def __init__(self, folder: str | Path):
        super().__init__()
        import transformers

        folder = Path(folder)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        # The class it was saved as (so every weight has its place), else AutoModel's for its model type.
        architecture = getattr(transformers, (config.architectures or [""])[0], None) or transformers.AutoModel
        model = architecture.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        model = getattr(model, "vision_model", model)  # a two-tower model (CLIP, SigLIP): its image tower
        self.model = model.eval().requires_grad_(False)
        size = getattr(self.model.config, "image_size", None)
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (size, size) if size else None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            settings = json.loads(processor.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # always frozen and in eval mode (no dropout, fixed norms)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[N] distances between frames ``x`` and ``y`` [N, 3, H, W] in [-1, 1]."""
        both = (torch.cat([x, y]) + 1) / 2
        if self.image_size and tuple(both.shape[-2:]) != self.image_size:
            both = F.interpolate(both, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        both = (both - self.mean.to(both.dtype)) / self.std.to(both.dtype)
        states = self.model(pixel_values=both, output_hidden_states=True).hidden_states
        total = 0.0
        for state in states:
            channel_dim = 1 if state.ndim == 4 else -1  # conv nets: [N, C, H, W]; transformers: [N, L, C]
            unit = F.normalize(state.float(), dim=channel_dim, eps=1e-10)
            a, b = unit.chunk(2)
            total = total + (a - b).square().sum(channel_dim).flatten(1).mean(1)
        return total / len(states)
