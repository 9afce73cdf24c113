"""A tiny classifier on scikit-learn's 8x8 handwritten digits, used as the FID feature extractor in demos.

Inception-v3 features are meaningless for 8x8 grey-scale digits (and need downloaded weights), so the
demo measures FID in the 64-d penultimate layer of a small CNN trained here in a few seconds on CPU.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftune.errors import UserError
from difftune.io.atomic import atomic_path

__all__ = [
    "DigitClassifier",
    "DigitFeatureExtractor",
    "load_classifier",
    "save_classifier",
    "train_digit_classifier",
]

IMAGE_SIZE = 8


class DigitClassifier(nn.Module):
    """Small CNN for ``(N, 1, 8, 8)`` digit images in ``[0, 1]``.

    Architecture: conv3x3(1->width) -> ReLU -> conv3x3(width->2*width) -> ReLU -> maxpool2
    -> linear(2*width*16 -> num_features) -> ReLU [features] -> linear(num_features -> num_classes).

    Args:
        width: channels of the first conv layer.
        num_features: size of the penultimate (feature) layer.
        num_classes: number of output classes.
    """

    def __init__(self, width: int = 16, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.width = width
        self.num_features = num_features
        self.num_classes = num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * (IMAGE_SIZE // 2) ** 2, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations: images ``(N, 1, 8, 8)`` -> features ``(N, num_features)``."""
        return F.relu(self.fc(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: images ``(N, 1, 8, 8)`` -> logits ``(N, num_classes)``."""
        return self.head(self.features(x))


def train_digit_classifier(
    images: Tensor,
    labels: Tensor,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_classes: int = 10,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with Adam; deterministic given ``seed`` on a fixed machine.

    Weight initialisation runs under ``torch.random.fork_rng`` seeded with ``seed`` (the global RNG is
    left untouched) and mini-batches are drawn from epoch-wise permutations of a seeded
    ``torch.Generator``. Runs on CPU in a few seconds for the default 1500 steps.

    Args:
        images: float tensor ``(N, 1, 8, 8)`` with values in ``[0, 1]``.
        labels: int64 tensor ``(N,)`` with class indices in ``0..num_classes - 1``.
        steps: number of optimisation steps.
        seed: seed for initialisation and shuffling.
        batch_size: mini-batch size.
        lr: Adam learning rate (cosine-decayed to 0).
        num_classes: classes of the classifier (10 digits; more when a variant of each is a class of its own).

    Returns:
        The trained classifier, in eval mode, on the CPU.

    Raises:
        ValueError: on malformed images or labels.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape (N, 1, 8, 8), got {tuple(images.shape)}")
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise ValueError("expected finite floating-point images")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError(
            f"expected images in [0, 1], got [{float(images.min()):.4g}, {float(images.max()):.4g}]"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype != torch.long:
        raise ValueError(
            f"expected int64 labels of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if images.shape[0] < 2 or steps < 1:
        raise ValueError(f"need >= 2 images and >= 1 step, got {images.shape[0]} images and {steps} steps")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")

    images, labels = images.detach().float().cpu(), labels.detach().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    model.train()
    n = images.shape[0]
    batch_size = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


class DigitFeatureExtractor(nn.Module):
    """Frozen feature extractor built on a trained :class:`DigitClassifier`.

    Accepts images ``(N, 1, H, W)`` or ``(N, 3, H, W)`` in ``[0, 1]``; RGB is averaged to grey and images
    that are not 8x8 are resized bilinearly (with antialiasing) to 8x8. Always stays in eval mode.

    Attributes:
        num_features: feature dimension (64 for the default classifier).
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> DigitFeatureExtractor:
        """Ignore ``mode``: the extractor always stays in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(N, 1|3, H, W)`` in ``[0, 1]`` -> features ``(N, num_features)``."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images of shape (N, 1, H, W) or (N, 3, H, W), got {tuple(images.shape)}"
            )
        param = next(self.classifier.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(
                x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        return self.classifier.features(x)


def save_classifier(model: DigitClassifier, path: str | os.PathLike[str]) -> None:
    """Save a classifier's weights and hyper-parameters to a safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"width": model.width, "num_features": model.num_features, "num_classes": model.num_classes}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"difftune_digit_classifier": json.dumps(config)})


def load_classifier(path: str | os.PathLike[str]) -> DigitClassifier:
    """Load a classifier written by :func:`save_classifier`; returned in eval mode on the CPU.

    Raises:
        ValueError: if the file lacks the classifier metadata or its tensors do not match.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "difftune_digit_classifier" not in meta:
        raise UserError(f"{path}: not a DigitClassifier file (missing metadata)")
    model = DigitClassifier(**json.loads(meta["difftune_digit_classifier"]))
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match DigitClassifier: {err}") from None
    return model.eval()
