"""The audit's templates: the built-in ones by name, a user's ``pm.Model`` or builder, and one
cached object per template per process (so the compiled-model and program caches hit across
audits)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

from engine.caching import LRUCache
from engine.errors import InputError

__all__ = ["MODELS", "MAX_CACHED_TEMPLATES", "cached_template", "quiet_pytensor", "resolve_model"]

MODELS = {"normal_normal": True, "student_t": False, "bernoulli_logit": False}
"""Built-in univariate templates (``engine.audit.vfe_models``) -> whether a closed form exists."""


def resolve_model(model, kind: str, dim: int, closed_form):
    """-> (pm.Model, model name, has closed form)."""
    from engine.audit import vfe_models

    if kind == "multivariate":
        if model not in (None, "mvnormal"):
            raise InputError("field 'model': multivariate beliefs use the built-in MvNormal template")
        return _cached_template("mvnormal", dim), "mvnormal", True
    if model is None:
        model = "normal_normal"
    if isinstance(model, str):
        if model not in MODELS:
            raise InputError(f"field 'model': unknown template {model!r}; built-in: {sorted(MODELS)}")
        exact = MODELS[model] if closed_form is None else bool(closed_form)
        return _cached_template(model), model, exact
    if callable(model) and not hasattr(model, "free_RVs"):
        name = getattr(model, "__name__", "custom")
        model = model()
    else:
        name = getattr(model, "name", "") or "custom"
    if not hasattr(model, "free_RVs"):
        raise InputError(f"field 'model': the builder returned {type(model).__name__}, not a pm.Model")
    return model, name, bool(closed_form)


MAX_CACHED_TEMPLATES = 16
"""Template models kept per process (built-ins and config-built ones)."""

_TEMPLATES = LRUCache(MAX_CACHED_TEMPLATES)


def cached_template(key: tuple, build: Callable[[], Any]):
    """One template per ``key`` per process (``build()`` on a miss), so that the same template
    object comes back and ``compile_for``'s and the program caches hit across audits."""
    return _TEMPLATES.get_or_build(key, build)


def _cached_template(name: str, *args):
    from engine.audit import vfe_models

    def build():
        with quiet_pytensor():
            return getattr(vfe_models, name)(*args)

    return cached_template((name,) + args, build)


@contextlib.contextmanager
def quiet_pytensor():
    """Silence PyTensor's C-BLAS notice: the engine runs the model through JAX, not C."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS")
        yield
