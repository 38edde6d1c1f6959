"""DCGAN (Radford et al. 2015): a transposed-conv generator and a strided-conv discriminator.

`DCGAN` only holds the pair: the training task puts `.generator` and `.discriminator` into their own
optimizers/engines and calls them directly. Sizes adapt to the data: the generator projects z to a
small seed map (7x7 for 28 px, 4x4 for 8 and 32 px) and doubles it until it reaches the image size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.layers import make_activation

_MAX_SEED_SIDE_PX = 7
_MIN_SEED_SIDE_PX = 4
_DCGAN_LEAKY_SLOPE = 0.2
_DCGAN_INIT_STD = 0.02


def _activation(name: str) -> nn.Module:
    # DCGAN's LeakyReLU slope is 0.2; the shared default (0.01) gives the discriminator's negative side
    # almost no gradient, which makes the generator's learning signal weak.
    if name == "leaky_relu":
        return nn.LeakyReLU(_DCGAN_LEAKY_SLOPE)
    return make_activation(name)


def upsampling_steps(side: int) -> int:
    """How many x2 upsamplings reach `side` px from a 4-7 px seed map.

    Exact halvings first (28 -> 14 -> 7, 32 -> ... -> 4, 8 -> 4); an odd side above 7 px is halved
    rounding up, and the generator crops its output back to the exact size.
    """
    steps = 0
    while side % 2 == 0 and side // 2 >= _MIN_SEED_SIDE_PX:
        side //= 2
        steps += 1
    while side > _MAX_SEED_SIDE_PX:
        side = math.ceil(side / 2)
        steps += 1
    return steps


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, C, H, W) in [-1, 1]."""

    def __init__(
        self,
        latent_dim: int,
        out_shape: tuple[int, int, int],
        base_channels: int = 64,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        out_channels, height, width = out_shape
        self.latent_dim = latent_dim  # read by the GAN task to draw z for this engine
        self.out_shape = (out_channels, height, width)
        steps = upsampling_steps(min(height, width))
        seed_h, seed_w = math.ceil(height / 2**steps), math.ceil(width / 2**steps)
        # Channels halve at every upsampling, ending at base_channels before the last layer.
        channels = base_channels * 2 ** max(steps - 1, 0)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, channels * seed_h * seed_w, bias=False),
            nn.Unflatten(1, (channels, seed_h, seed_w)),
            nn.BatchNorm2d(channels),
            _activation(activation),
        )
        layers: list[nn.Module] = []
        for _ in range(steps - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels // 2),
                _activation(activation),
            ]
            channels //= 2
        if steps > 0:
            layers.append(nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1))
        else:  # the image is no bigger than a seed map: one conv to the image channels
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        layers.append(nn.Tanh())
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.upsample(self.project(z))
        _, height, width = self.out_shape
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        return x[..., top : top + height, left : left + width]  # a no-op unless a side was rounded up


class Discriminator(nn.Module):
    """Images (N, C, H, W) -> one real/fake logit per sample, shape (N,)."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        base_channels: int = 64,
        activation: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c_in, height, width = in_shape
        layers: list[nn.Module] = []
        c_out = base_channels
        # 4x4 stride-2 convs halve the map (rounding down) until it is 2-3 px; channels double up to 8x.
        while min(height, width) >= 4:
            is_first_layer = not layers
            # DCGAN: no BatchNorm on the layer that sees the raw images, so that layer keeps its bias.
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=is_first_layer))
            if not is_first_layer:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(_activation(activation))
            c_in, c_out = c_out, min(c_out * 2, base_channels * 8)
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * height * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's init: weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, _DCGAN_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, _DCGAN_INIT_STD)
        nn.init.zeros_(module.bias)


class DCGAN(nn.Module):
    """Holds `.generator` and `.discriminator`; forward(z) = generator(z). `num_classes` is unused."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 64,
        base_channels: int = 64,
        g_activation: str = "relu",
        d_activation: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"DCGAN needs image input (C, H, W), got input_shape {input_shape}")
        image_shape = (input_shape[0], input_shape[1], input_shape[2])
        self.latent_dim = latent_dim
        self.generator = Generator(latent_dim, image_shape, base_channels, g_activation)
        self.discriminator = Discriminator(image_shape, base_channels, d_activation, dropout)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from z ~ N(0, I), for viewing (no autograd). Call in eval mode: BatchNorm."""
        param = next(self.generator.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=param.device, dtype=param.dtype)
        return self.generator(z)
