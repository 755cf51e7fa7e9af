"""clip_hvt: CLIP-style contrastive pretraining for hierarchical vision transformers.

Importing the package registers our image encoders (CvT, multiscale-pooled trunks) in timm's
registry, so open_clip's ``TimmModel`` can build them by name.
"""
import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: for imports, which build long-lived objects only (torch, timm,
    Lightning: about a million), so a collection while they are built frees nothing and costs about a
    second of every command's start-up."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


with gc_paused():
    from . import models  # noqa: F401  (registers timm models)

__version__ = "0.1.0"
