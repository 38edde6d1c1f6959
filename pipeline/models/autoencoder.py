"""A convolutional autoencoder and a variational one (Kingma & Welling 2013) sharing the same body.

Encoder: 3x3 stride-2 convs (one per entry of `channels`), flatten, linear bottleneck. Decoder: the
mirror image, a linear layer back to the smallest map and 3x3 stride-2 transposed convs. Each transposed
conv's output_padding is chosen from the encoder's map sizes, so odd sizes (28 -> 14 -> 7 -> 14 -> 28)
and even ones (8, 32) come back exactly, with no crop or interpolation.

The reconstruction has no final activation: it lives in the same normalised space as the input, so the
task compares x_hat with x directly (e.g. MSE).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.layers import make_activation


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"autoencoders need image input (C, H, W), got input_shape {input_shape}")
    return input_shape[0], input_shape[1], input_shape[2]


class ConvEncoder(nn.Module):
    """(N, C, H, W) -> (N, features): strided conv -> BatchNorm -> activation per channel entry."""

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], activation: str) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one conv stage")
        c_in, height, width = image_shape
        self.channels = channels
        # The decoder mirrors these: the input size then the size after each stage, and each stride.
        self.map_sizes = [(height, width)]
        self.strides: list[int] = []
        layers: list[nn.Module] = []
        for c_out in channels:
            # Once the map is 1 px a stride of 2 would change nothing but the decoder's arithmetic.
            stride = 2 if min(height, width) >= 2 else 1
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                make_activation(activation),
            ]
            height, width = math.ceil(height / stride), math.ceil(width / stride)
            self.map_sizes.append((height, width))
            self.strides.append(stride)
            c_in = c_out
        self.out_shape = (c_in, height, width)
        self.net = nn.Sequential(*layers, nn.Flatten())

    @property
    def features(self) -> int:
        return math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(N, latent_dim) -> (N, C, H, W), the mirror image of `encoder`; no final activation."""

    def __init__(self, latent_dim: int, encoder: ConvEncoder, out_channels: int, activation: str) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(latent_dim, encoder.features),
            make_activation(activation),
            nn.Unflatten(1, encoder.out_shape),
        )
        conv_channels = [out_channels, *encoder.channels]
        layers: list[nn.Module] = []
        # Walk the encoder backwards: stage i mapped map_sizes[i] -> map_sizes[i + 1].
        for i in reversed(range(len(encoder.strides))):
            stride = encoder.strides[i]
            (h_big, w_big), (h_small, w_small) = encoder.map_sizes[i], encoder.map_sizes[i + 1]
            # A 3x3 transposed conv (padding 1) gives stride * (n - 1) + 1 + output_padding.
            output_padding = (h_big - stride * (h_small - 1) - 1, w_big - stride * (w_small - 1) - 1)
            c_in, c_out = conv_channels[i + 1], conv_channels[i]
            is_last_layer = i == 0  # it emits the reconstruction: no norm, no activation, so a bias
            layers.append(
                nn.ConvTranspose2d(
                    c_in,
                    c_out,
                    3,
                    stride=stride,
                    padding=1,
                    output_padding=output_padding,
                    bias=is_last_layer,
                )
            )
            if not is_last_layer:
                layers += [nn.BatchNorm2d(c_out), make_activation(activation)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z))


class ConvAutoencoder(nn.Module):
    """encode(x) -> z (N, latent_dim); decode(z) -> x_hat (N, C, H, W); forward(x) = decode(encode(x))."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 32,
        channels: tuple[int, ...] = (32, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        image_shape = _image_shape(input_shape)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(image_shape, tuple(channels), activation)
        self.dropout = nn.Dropout(dropout)
        self.to_latent = nn.Linear(self.encoder.features, latent_dim)
        self.decoder = ConvDecoder(latent_dim, self.encoder, image_shape[0], activation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.dropout(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class ConvVAE(nn.Module):
    """encode(x) -> (mu, logvar), each (N, latent_dim); forward(x) -> (x_hat, mu, logvar).

    forward samples z in training mode and decodes z = mu in eval mode, so validation error is
    deterministic. The task owns the loss: reconstruction + KL(N(mu, exp(logvar)) || N(0, I)).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 32,
        channels: tuple[int, ...] = (32, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        image_shape = _image_shape(input_shape)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(image_shape, tuple(channels), activation)
        self.dropout = nn.Dropout(dropout)
        self.to_mu = nn.Linear(self.encoder.features, latent_dim)
        self.to_logvar = nn.Linear(self.encoder.features, latent_dim)
        self.decoder = ConvDecoder(latent_dim, self.encoder, image_shape[0], activation)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(self.encoder(x))
        return self.to_mu(h), self.to_logvar(h)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample that gradients flow through to mu and logvar."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ N(0, I) on the module's device, for viewing (no autograd).

        Call in eval mode so BatchNorm uses its running statistics; `generator` must live on the
        module's device.
        """
        param = next(self.decoder.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=param.device, dtype=param.dtype)
        return self.decode(z)
