"""The image file formats difftune reads (training data, evaluation), known without importing PIL or torch."""

from __future__ import annotations

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
