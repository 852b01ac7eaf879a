"""Hook specifications: the whole plugin surface of cxrtool.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` whose names match the
specs below. ``register_*`` hooks receive a ``register`` callback and call it once per thing they add;
that keeps the signatures stable when the specs grow. Built-in plugins use exactly these hooks.
Every hook here is documented in ``docs/plugins.md`` (a test checks the two agree).
"""

from __future__ import annotations

import pluggy

PROJECT = "cxrtool"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_models(register):
    """Call ``register(ModelSpec(...))`` for each model architecture the plugin provides."""


@hookspec
def register_augmentations(register):
    """Call ``register(AugmentationSpec(...))`` for each named batch augmentation."""


@hookspec
def register_explainers(register):
    """Call ``register(ExplainerSpec(...))`` for each attribution / visualisation method."""


@hookspec
def register_anomaly_detectors(register):
    """Call ``register(DetectorSpec(...))`` for each anomaly detector trained on normal images only."""


@hookspec
def register_projections(register):
    """Call ``register(ProjectionSpec(...))`` for each 2-D projection of embeddings (t-SNE, PCA, ...)."""


@hookspec(firstresult=True)
def read_image(path, max_size):
    """Decode ``path`` into a float32 greyscale array (H, W) in [0, 1], or return None if not understood.

    ``max_size`` is a hint (the model input size, or None for full resolution): a reader may decode
    at a reduced scale as long as both sides stay >= max_size. The first reader that returns wins.
    """


@hookspec
def register_commands(app):
    """Add Typer commands or sub-apps to the ``cxrtool`` command line ``app``."""
