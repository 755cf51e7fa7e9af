"""Image encoders registered in timm's registry (one file per family, as timm does).

``cvt`` is imported before ``multiscale`` so multiscale variants of CvT can be registered.
"""
from . import cvt, multiscale  # noqa: F401
