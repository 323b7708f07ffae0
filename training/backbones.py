"""Small CIFAR-native backbones, registered in timm so `timm.create_model` builds them like any other.

`cifar_convnet` follows the airbench94 design (Keller Jordan, 2024): a frozen 2x2 patch-whitening
convolution, three conv groups with max-pooling and BatchNorm, GELU. It trains to ~94% on CIFAR-10 in
about ten epochs and runs ~950 img/s forward+backward on two CPU cores, where ImageNet-stem models
shrink a 32 px image to nothing.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models import register_model


class _Conv(nn.Conv2d):
    """3x3 'same' convolution initialised close to identity (dirac), which trains faster from scratch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale: only the shift learns (airbench's choice)."""

    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = _Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(channels_out)
        self.conv2 = _Conv(channels_out, channels_out)
        self.norm2 = _BatchNorm(channels_out)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class CifarConvNet(nn.Module):
    """Feature extractor for 28-32 px images; `num_features` pooled features, timm-style interface."""

    def __init__(self, widths: tuple[int, int, int] = (64, 256, 256), in_chans: int = 3, num_classes: int = 0):
        super().__init__()
        whiten_width = 2 * in_chans * 2 * 2
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        self.stages = nn.Sequential(
            nn.GELU(),
            _ConvGroup(whiten_width, widths[0]),
            _ConvGroup(widths[0], widths[1]),
            _ConvGroup(widths[1], widths[2]),
        )
        self.num_features = widths[2]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of `images` (normalised float NCHW): the airbench trick
        that makes the first epochs count."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
        eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
        scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
        self.whiten.weight.copy_(torch.cat((scaled, -scaled)))
        self.whiten.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.whiten(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.amax(x, dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head


_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


def _create(widths: tuple[int, int, int], pretrained: bool, **kwargs) -> CifarConvNet:
    if pretrained:
        raise ValueError("cifar_convnet models have no hub weights: train from scratch or load a local weights file")
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    kwargs.pop("drop_rate", None)
    return CifarConvNet(widths=widths, **kwargs)


@register_model
def cifar_convnet(pretrained: bool = False, **kwargs) -> CifarConvNet:
    """airbench94-style network, widths 64/256/256 (~2M parameters)."""
    return _create((64, 256, 256), pretrained, **kwargs)


@register_model
def cifar_convnet_small(pretrained: bool = False, **kwargs) -> CifarConvNet:
    """A narrow variant (widths 32/64/128) for tests and quick demos."""
    return _create((32, 64, 128), pretrained, **kwargs)


@register_model
def cifar_convnet_wide(pretrained: bool = False, **kwargs) -> CifarConvNet:
    """airbench96-like widths 128/384/512, slower but stronger."""
    return _create((128, 384, 512), pretrained, **kwargs)
