"""Feature extractors named by ``--features``: the FID Inception, a digit classifier, or your own module."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from difftune.errors import UserError
from difftune.plugins import import_object

__all__ = ["FEATURE_SPECS", "build_extractor"]

FEATURE_SPECS = ("inception", "digits:PATH", "module:function")


def build_extractor(spec: str, inception_weights: str | None = None) -> nn.Module:
    """Feature extractor named by ``--features``: float images ``(B, C, H, W)`` in ``[0, 1]`` -> ``(B, D)``.

    ``inception`` is the FID Inception-v3 (:func:`~difftune.metrics.inception.inception_extractor`);
    ``digits:PATH`` a saved :class:`~difftune.metrics.DigitClassifier`; ``module:function`` calls
    ``function()`` of an importable module, which must return an ``nn.Module``.

    Raises:
        ValueError / FileNotFoundError: unknown spec, missing file, or a bad custom extractor.
    """
    if spec == "inception":
        from difftune.metrics.inception import inception_extractor

        return inception_extractor(inception_weights)
    if inception_weights is not None:
        raise UserError(f"--inception-weights only applies to --features inception, not {spec!r}")
    kind, _, rest = spec.partition(":")
    if not kind or not rest:
        raise UserError(f"--features {spec!r} is not understood; valid: {', '.join(FEATURE_SPECS)}")
    if kind == "digits":
        from difftune.metrics.digits import DigitFeatureExtractor, load_classifier

        if not Path(rest).is_file():
            raise FileNotFoundError(f"digit classifier {rest!r} not found (--features digits:PATH)")
        try:
            return DigitFeatureExtractor(load_classifier(rest))
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type on a file that is not safetensors
            raise UserError(f"{rest}: not a DigitClassifier file ({type(err).__name__}: {err})") from None
    factory = import_object(spec, "--features")
    if not callable(factory):
        raise UserError(f"--features {spec!r}: module {kind!r} has no callable {rest!r}")
    extractor = factory()
    if not isinstance(extractor, nn.Module):
        raise UserError(
            f"--features {spec!r} returned {type(extractor).__name__}, expected a torch.nn.Module"
        )
    return extractor
