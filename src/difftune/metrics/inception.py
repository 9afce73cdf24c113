"""The FID Inception-v3 feature extractor (torchmetrics / torch-fidelity), usable offline.

torchmetrics' ``FrechetInceptionDistance`` builds ``NoTrainInceptionV3(name="inception-v3-compat",
features_list=["2048"], feature_extractor_weights_path=...)``, a subclass of torch-fidelity's
``FeatureExtractorInceptionV3``. With no weights path torch-fidelity downloads the weights on first use;
given a path it ``torch.load``-s the state dict from there. The file is the TensorFlow FID Inception
(2015-12-05) converted to PyTorch, the same state dict that pytorch-fid ships as
``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity as ``weights-inception-2015-12-05-6726825d.pth``.

:func:`inception_extractor` wraps that network so it takes float images in ``[0, 1]`` like every other
difftune extractor (see :mod:`difftune.metrics.fid`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from difftune.errors import UserError

__all__ = ["INCEPTION_FEATURES", "InceptionFeatureExtractor", "inception_extractor"]

INCEPTION_FEATURES = 2048
_INSTALL_HINT = (
    "--features inception needs torch-fidelity (pip install torch-fidelity); "
    "or use --features digits:PATH or module:function"
)


class InceptionFeatureExtractor(nn.Module):
    """FID Inception-v3 pool features for float images in ``[0, 1]``; always in eval mode.

    The Inception FID expects 8-bit RGB: images are rounded to ``0..255`` (what saving them as PNG does;
    torchmetrics' ``normalize=True`` truncates instead) and grey images are repeated to 3 channels.
    The network resizes to 299x299 itself.

    Args:
        net: a torchmetrics ``NoTrainInceptionV3`` (or any module mapping uint8 ``(N, 3, H, W)`` to
            ``(N, 2048)``).

    Attributes:
        num_features: 2048.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()
        self.num_features = INCEPTION_FEATURES

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Ignore ``mode``: the extractor always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Images ``(N, 1|3, H, W)`` in ``[0, 1]`` -> features ``(N, 2048)`` float32."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images of shape (N, 1, H, W) or (N, 3, H, W), got {tuple(images.shape)}"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        device = next(self.net.parameters()).device
        x = (images.float().clamp(0, 1) * 255).round().to(device=device, dtype=torch.uint8)  # (N, 3, H, W)
        return self.net(x).float()


def inception_extractor(
    weights_path: str | os.PathLike[str] | None = None, antialias: bool = False
) -> nn.Module:
    """Build the FID Inception-v3 extractor: float images ``(N, C, H, W)`` in ``[0, 1]`` -> ``(N, 2048)``.

    Args:
        weights_path: local FID Inception state dict (``pt_inception-2015-12-05-6726825d.pth``), so that
            nothing is downloaded. ``None`` lets torch-fidelity download (and cache) the weights.
        antialias: resize to 299x299 with antialiased bilinear interpolation (torchmetrics' default).
            The default ``False`` uses torch-fidelity's TensorFlow-1-compatible bilinear resize, as the
            TensorFlow reference FID (and guided-diffusion's evaluator) do, so numbers are comparable
            with published ones.

    Returns:
        An :class:`InceptionFeatureExtractor` in eval mode on the CPU.

    Raises:
        FileNotFoundError: ``weights_path`` is given but is not a file.
        ValueError: torch-fidelity is not installed, or the weights cannot be loaded or downloaded
            (one-line messages, fit for the command line).
    """
    path: Path | None = None
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {str(weights_path)!r} not found: give the FID Inception state dict "
                "(pt_inception-2015-12-05-6726825d.pth), or omit --inception-weights to download it"
            )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:  # torch-fidelity itself, or one of its imports (torchvision)
        raise UserError(f"{_INSTALL_HINT} ({err})") from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    where = str(path) if path is not None else "the torch-fidelity download"
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(path) if path is not None else None,
            antialias=antialias,
        )
    except ModuleNotFoundError:  # torchmetrics was imported before torch-fidelity became importable
        raise UserError(_INSTALL_HINT) from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if path is not None else " (offline? pass --inception-weights PATH)"
        raise UserError(f"cannot load Inception weights from {where}{hint}: {first}") from None
    return InceptionFeatureExtractor(net)
