"""clip_hvt: CLIP-style contrastive pretraining for hierarchical vision transformers.

Importing the package registers our image encoders (CvT, multiscale-pooled trunks) in timm's
registry, so open_clip's ``TimmModel`` can build them by name.
"""
from . import models  # noqa: F401  (registers timm models)

__version__ = "0.1.0"
