"""The one change this package makes to anomalib's own code: ``Engine.export`` names the model options it drops.

anomalib's ``Engine.export(model, ckpt_path=...)`` (what ``anomalib export --ckpt_path`` runs) replaces ``model`` by
``model.__class__.load_from_checkpoint(ckpt_path)``: the model built from the ``--model.*`` flags is dropped and one is
built from the checkpoint's options, without a word about the flags that differ. For our models
(:class:`~anomalib_hypergraph.models.checkpoints.CheckpointGuard` subclasses) the wrapped ``export`` hands the given
model's options to ``load_from_checkpoint`` (:func:`~anomalib_hypergraph.models.checkpoints.options_given`), which
names every one that differs. Any other model exports exactly as before. :func:`install` runs when the package is
imported (the ``anomalib`` command imports it through its start-up hook).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from anomalib.engine import Engine

from anomalib_hypergraph.models.checkpoints import CheckpointGuard, options_given


def export_naming_given_options(export: Callable) -> Callable:
    """Wrap ``Engine.export`` so that a checkpoint export of our models names the given options it does not use."""
    signature = inspect.signature(export)

    @functools.wraps(export)
    def export_with_given_options(engine: Engine, *args: Any, **kwargs: Any) -> Any:
        try:
            arguments = signature.bind(engine, *args, **kwargs).arguments
        except TypeError:  # anomalib reports wrong arguments itself
            return export(engine, *args, **kwargs)
        model = arguments.get("model")
        if not arguments.get("ckpt_path") or not isinstance(model, CheckpointGuard):
            return export(engine, *args, **kwargs)
        with options_given(model.hparams):
            return export(engine, *args, **kwargs)

    export_with_given_options.names_given_options = True
    return export_with_given_options


def install() -> None:
    """Wrap ``Engine.export`` (once)."""
    if not getattr(Engine.export, "names_given_options", False):
        Engine.export = export_naming_given_options(Engine.export)
