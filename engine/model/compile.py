"""Compile ONE PyMC model template into pure JAX functions of (position, data).

A template is a ``pm.Model`` whose per-problem inputs are ``pm.Data`` containers. Each container
named in the user's data becomes a symbolic input (``clone_replace``), the free value variables
become slices of one flat unconstrained vector, and PyTensor's JAX backend turns the graph into
``logdensity_fn(position, data)``. Problems then differ only in ``data``, so one compiled program
serves all of them under ``vmap`` (``batch.py``).

Ragged problems (different row counts along axis 0) are padded to one length by repeating
their last row, and the elementwise log-likelihood of every row-indexed observed variable is
zeroed past each problem's own row count (a row mask in ``data[ROW_MASK]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile import SharedVariable
from pytensor.graph.replace import clone_replace
from pytensor.graph.traversal import ancestors

from engine.model._pymc_jax import get_jaxified_graph
from engine.errors import InputError

ROW_MASK = "__row_mask__"
"""Key of the boolean row mask ``[n_rows_padded]`` inside a problem's data dict."""

__all__ = ["ROW_MASK", "ProblemData", "CompiledModel", "prepare_data", "compile_model", "is_hierarchical", "graph_fingerprint"]


@dataclass(frozen=True)
class ProblemData:
    """Per-problem inputs stacked along a leading problem axis.

    Attributes
    ----------
    arrays
        container name -> array ``[num_problems, *per_problem_shape]`` (ragged ones padded).
    num_rows
        ``[num_problems]`` real row counts when any container is ragged, else ``None``.
    ragged_names
        Containers that were given as lists of different lengths.
    """

    arrays: dict[str, np.ndarray]
    num_rows: np.ndarray | None
    ragged_names: tuple[str, ...]

    @property
    def num_problems(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    @property
    def is_ragged(self) -> bool:
        return self.num_rows is not None

    def device_arrays(self) -> dict[str, np.ndarray]:
        """The arrays the compiled functions take, the row mask included when ragged."""
        out = dict(self.arrays)
        if self.num_rows is not None:
            n_pad = self.arrays[self.ragged_names[0]].shape[1]
            out[ROW_MASK] = np.arange(n_pad)[None, :] < self.num_rows[:, None]
        return out

    def select(self, index: np.ndarray) -> "ProblemData":
        """Problems ``index`` (a 1-D integer array), same padding."""
        return ProblemData(
            arrays={k: v[index] for k, v in self.arrays.items()},
            num_rows=None if self.num_rows is None else self.num_rows[index],
            ragged_names=self.ragged_names,
        )


def _container_map(model) -> dict[str, SharedVariable]:
    return {v.name: v for v in model.data_vars}


def prepare_data(model, data: Mapping[str, Any]) -> ProblemData:
    """Validate ``data`` against ``model``'s ``pm.Data`` containers and stack it.

    Parameters
    ----------
    model
        The ``pm.Model`` template.
    data
        container name -> array whose leading axis indexes problems, or a list of per-problem
        arrays whose leading axes (rows) may differ.

    Raises
    ------
    InputError (a ValueError)
        Unknown container names, no data, mismatched numbers of problems, ragged containers of
        different row counts, or per-problem shapes that disagree beyond axis 0; the message
        names the container and the first offending problem index.
    """
    containers = _container_map(model)
    if not data:
        raise InputError("data is empty: give at least one pm.Data container's per-problem values")
    unknown = sorted(set(data) - set(containers))
    if unknown:
        raise InputError(
            f"data container {unknown[0]!r} is not in the model; its pm.Data containers are "
            f"{sorted(containers)}"
        )
    arrays: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, value in data.items():
        dtype = containers[name].dtype
        if isinstance(value, (list, tuple)) and len(value) and all(np.ndim(v) == 0 for v in value):
            value = np.asarray(value, dtype=dtype)  # one scalar per problem
        if isinstance(value, (list, tuple)):
            items = [np.asarray(v, dtype=dtype) for v in value]
            if not items:
                raise InputError(f"data container {name!r}: empty list of problems")
            tail = items[0].shape[1:]
            for i, item in enumerate(items):
                if item.ndim == 0:
                    raise InputError(
                        f"data container {name!r}: problem {i} is a scalar; ragged problems need "
                        "a leading row axis"
                    )
                if item.shape[1:] != tail:
                    raise InputError(
                        f"data container {name!r}: problem {i} has shape {item.shape}, expected "
                        f"(rows, {', '.join(map(str, tail))}) like problem 0"
                    )
                if item.shape[0] == 0:
                    raise InputError(f"data container {name!r}: problem {i} has no rows")
            rows = np.array([it.shape[0] for it in items])
            counts[name] = len(items)
            if np.all(rows == rows[0]):
                arrays[name] = np.stack(items)
            else:
                n_pad = int(rows.max())
                padded = [
                    np.concatenate([it, np.repeat(it[-1:], n_pad - it.shape[0], axis=0)])
                    for it in items
                ]
                arrays[name] = np.stack(padded)
                lengths[name] = rows
        else:
            arr = np.asarray(value, dtype=dtype)
            if arr.ndim == 0:
                raise InputError(
                    f"data container {name!r} is a scalar; its leading axis must index problems"
                )
            arrays[name] = arr
            counts[name] = arr.shape[0]
    first_name = next(iter(counts))
    for name, count in counts.items():
        if count != counts[first_name]:
            raise InputError(
                f"data container {name!r} has {count} problems but {first_name!r} has "
                f"{counts[first_name]}; leading axes must match"
            )
    num_rows = None
    if lengths:
        ref_name = next(iter(lengths))
        ref = lengths[ref_name]
        for name, rows in lengths.items():
            bad = np.flatnonzero(rows != ref)
            if bad.size:
                raise InputError(
                    f"ragged data container {name!r}: problem {bad[0]} has {rows[bad[0]]} rows "
                    f"but {ref_name!r} has {ref[bad[0]]}"
                )
        num_rows = ref
    for name, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)) if (
            np.issubdtype(arr.dtype, np.floating)
        ) else np.array([], dtype=int)
        if bad.size:
            raise InputError(f"data container {name!r}: non-finite value in problem {bad[0]}")
    return ProblemData(arrays=arrays, num_rows=num_rows, ragged_names=tuple(lengths))


@dataclass(eq=False)
class CompiledModel:
    """A template compiled for one padded per-problem data shape.

    All functions act on ONE problem: ``position`` is the flat unconstrained vector ``[dim]``
    and ``data`` maps input names (and ``ROW_MASK`` when ragged) to that problem's arrays.

    Attributes
    ----------
    logdensity_fn
        ``(position, data) -> scalar`` log density on the unconstrained space (Jacobians
        included), observed rows past a problem's length masked out.
    constrain_fn
        ``(position, data) -> {name: array}`` constrained free variables and Deterministics.
    loglik_fn
        ``(position, data) -> {observed name: elementwise log-likelihood}``; padded rows are 0.
    initial_position
        ``[dim]`` the model's initial point on the unconstrained space.
    input_names
        Per-problem container names the functions read from ``data``.
    var_shapes
        Constrained output name -> per-problem shape (free variables first, then Deterministics).
    free_var_names
        Names of the free random variables (constrained), a subset of ``var_shapes``.
    observed_shapes
        Observed variable name -> padded elementwise shape.
    row_indexed_names
        Observed variables indexed by the ragged row axis (their padded rows are masked).
    is_hierarchical
        Whether a free variable's prior reads another free variable (a sampled location or scale,
        :func:`is_hierarchical`); the ``auto`` sampler's choice of kernel reads it.
    """

    logdensity_fn: Callable
    constrain_fn: Callable
    loglik_fn: Callable
    initial_position: np.ndarray
    input_names: tuple[str, ...]
    var_shapes: dict[str, tuple[int, ...]]
    free_var_names: tuple[str, ...]
    observed_shapes: dict[str, tuple[int, ...]]
    value_slices: dict[str, tuple[slice, tuple[int, ...]]] = field(default_factory=dict)
    row_indexed_names: tuple[str, ...] = ()
    is_hierarchical: bool = False

    @property
    def dim(self) -> int:
        return int(self.initial_position.shape[0])


def _row_indexed_observed(model, ragged: set[str]) -> set[str]:
    """Observed variable names whose rows follow the ragged containers; refuse what cannot be masked.

    Padding is exact only where every padded row's log density term can be zeroed: an observed
    variable whose observed value IS a ragged container and whose log density is elementwise
    along its rows. Refused, each with one line naming the variable and why:

    - an observed variable that reads a ragged container but whose value is not one;
    - an observed variable whose rows form ONE joint draw (the row axis is part of its support,
      e.g. MvNormal over rows, GaussianRandomWalk, AR): its log density is one term for all rows;
    - a Potential or a free variable whose graph reads a ragged container (an unmaskable term).

    Raises
    ------
    InputError
    """
    if not ragged:
        return set()
    containers = _container_map(model)
    ragged_vars = {containers[n] for n in ragged}

    def first_ragged(graph_vars):
        used = ragged_vars.intersection(ancestors(graph_vars))
        return sorted(v.name for v in used)[0] if used else None

    row_indexed = set()
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        if value in ragged_vars:
            ndim_supp = int(getattr(rv.owner.op, "ndim_supp", 0) or 0)
            if ndim_supp >= value.ndim:
                raise InputError(
                    f"observed variable {rv.name!r} ({type(rv.owner.op).__name__}) treats the rows "
                    f"of ragged data {value.name!r} as one joint draw; the engine cannot mask its "
                    "padded rows (give every problem the same number of rows)"
                )
            row_indexed.add(rv.name)
            continue
        used = first_ragged([rv])
        if used:
            raise InputError(
                f"observed variable {rv.name!r} reads ragged container {used!r} but its observed "
                "value is not a ragged container, so its rows cannot be masked; pass its observed "
                "data as a pm.Data container with one row per data row"
            )
    for pot in model.potentials:
        used = first_ragged([pot])
        if used:
            raise InputError(f"Potential {pot.name!r} reads ragged data {used!r}; the engine cannot mask it")
    for rv in model.free_RVs:
        used = first_ragged([rv])
        if used:
            raise InputError(
                f"free variable {rv.name!r} depends on ragged data {used!r} (its size or parameters); "
                "the engine cannot mask its padded part"
            )
    if not row_indexed:
        raise InputError(
            f"ragged containers {sorted(ragged)} are not the observed value of any variable; "
            "ragged data must be observed row by row"
        )
    return row_indexed


def is_hierarchical(model) -> bool:
    """Whether any free variable's distribution parameters depend on another free variable
    (hierarchical or otherwise dependent priors: funnels, sampled scales), read from the graph."""
    try:
        from pytensor.graph.traversal import ancestors
    except ImportError:  # pytensor < 2.32
        from pytensor.graph.basic import ancestors

    free = list(model.free_RVs)
    for rv in free:
        others = {id(o) for o in free if o is not rv}
        if any(id(node) in others for node in ancestors(rv.owner.inputs)):
            return True
    return False


def compile_model(model, problem_data: ProblemData) -> CompiledModel:
    """Compile ``model`` into JAX functions for problems shaped like ``problem_data``.

    Parameters
    ----------
    model
        ``pm.Model`` whose per-problem inputs are ``pm.Data`` containers.
    problem_data
        Stacked (and padded) per-problem data from :func:`prepare_data`; only its names, dtypes
        and per-problem shapes are used, so compile once per padded shape.
    """
    containers = _container_map(model)
    input_names = tuple(problem_data.arrays)
    ragged = set(problem_data.ragged_names)
    row_indexed = _row_indexed_observed(model, ragged)

    initial_point = model.initial_point()
    value_vars = model.value_vars
    slices: dict[str, tuple[slice, tuple[int, ...]]] = {}
    offset = 0
    for vv in value_vars:
        shape = tuple(np.shape(initial_point[vv.name]))
        size = int(np.prod(shape, dtype=int))
        slices[vv.name] = (slice(offset, offset + size), shape)
        offset += size
    dim = offset
    if dim == 0:
        raise InputError("the model has no free random variables to sample")
    if model.discrete_value_vars:
        raise InputError(
            f"discrete free variable {model.discrete_value_vars[0].name!r}: NUTS needs "
            "continuous parameters; marginalise it or make it observed"
        )
    initial_position = np.concatenate(
        [np.ravel(initial_point[vv.name]).astype(np.float64) for vv in value_vars]
    )

    flat = pt.vector("__position__", dtype=pytensor.config.floatX, shape=(dim,))
    replacements: dict[Any, Any] = {}
    for vv in value_vars:
        sl, shape = slices[vv.name]
        replacements[vv] = flat[sl].reshape(shape).astype(vv.dtype)
    inputs = []
    for name in input_names:
        arr = problem_data.arrays[name]
        sym = pt.tensor(name=name, dtype=containers[name].dtype, shape=arr.shape[1:])
        replacements[containers[name]] = sym
        inputs.append(sym)
    mask_sym = None
    n_pad = None
    if ragged:
        n_pad = problem_data.arrays[problem_data.ragged_names[0]].shape[1]
        mask_sym = pt.vector(ROW_MASK, dtype="bool", shape=(n_pad,))

    free_terms = model.logp(vars=model.free_RVs, sum=False) if model.free_RVs else []
    obs_terms = model.logp(vars=model.observed_RVs, sum=False) if model.observed_RVs else []
    pot_terms = model.logp(vars=model.potentials, sum=False) if model.potentials else []
    masked_obs = []
    for rv, term in zip(model.observed_RVs, obs_terms):
        if rv.name in row_indexed:
            mask = mask_sym.reshape((n_pad,) + (1,) * (term.ndim - 1))
            term = pt.switch(mask, term, pt.zeros_like(term))
        masked_obs.append(term)
    logp = pt.add(*[t.sum() for t in free_terms + masked_obs + pot_terms])

    free_names = [rv.name for rv in model.free_RVs]
    det_names = [d.name for d in model.deterministics]
    wanted = set(free_names + det_names)
    value_outputs = [v for v in model.unobserved_value_vars if v.name in wanted]
    value_outputs.sort(key=lambda v: (free_names + det_names).index(v.name))
    out_names = [v.name for v in value_outputs]

    all_outputs = [logp, *value_outputs, *masked_obs]
    replaced = clone_replace(all_outputs, replace=replacements)
    sym_inputs = [flat, *inputs] + ([mask_sym] if mask_sym is not None else [])
    try:
        logp_jax = get_jaxified_graph(inputs=sym_inputs, outputs=[replaced[0]])
        values_jax = get_jaxified_graph(
            inputs=sym_inputs, outputs=replaced[1 : 1 + len(value_outputs)]
        )
        loglik_jax = (
            get_jaxified_graph(inputs=sym_inputs, outputs=replaced[1 + len(value_outputs) :])
            if masked_obs
            else None
        )
    except NotImplementedError as err:  # an operation without a JAX implementation
        msg = " ".join(str(err).split())[:200]
        raise InputError(f"the model could not be compiled to JAX: {msg}") from err

    arg_names = list(input_names) + ([ROW_MASK] if mask_sym is not None else [])

    def _args(position, data):
        return [position, *[data[n] for n in arg_names]]

    def logdensity_fn(position, data):
        return logp_jax(*_args(position, data))[0]

    def constrain_fn(position, data):
        return dict(zip(out_names, values_jax(*_args(position, data))))

    obs_names = [rv.name for rv in model.observed_RVs]

    def loglik_fn(position, data):
        if loglik_jax is None:
            return {}
        return dict(zip(obs_names, loglik_jax(*_args(position, data))))

    shapes = _output_shapes(values_jax, loglik_jax, initial_position, problem_data, arg_names)
    compiled = CompiledModel(
        logdensity_fn=logdensity_fn,
        constrain_fn=constrain_fn,
        loglik_fn=loglik_fn,
        initial_position=initial_position,
        input_names=input_names,
        var_shapes=dict(zip(out_names, shapes[0])),
        free_var_names=tuple(free_names),
        observed_shapes=dict(zip(obs_names, shapes[1])),
        value_slices=slices,
        row_indexed_names=tuple(sorted(row_indexed)),
        is_hierarchical=is_hierarchical(model),
    )
    return compiled


def _output_shapes(values_jax, loglik_jax, position, problem_data, arg_names):
    """Per-problem output shapes, found by abstract evaluation (no FLOPs)."""
    import jax

    example = problem_data.select(np.array([0])).device_arrays()
    args = [jax.ShapeDtypeStruct(position.shape, np.float64)] + [
        jax.ShapeDtypeStruct(example[n].shape[1:], example[n].dtype) for n in arg_names
    ]
    value_shapes = [tuple(o.shape) for o in jax.eval_shape(values_jax, *args)]
    obs_shapes = (
        [tuple(o.shape) for o in jax.eval_shape(loglik_jax, *args)] if loglik_jax else []
    )
    return value_shapes, obs_shapes


def unravel(compiled: CompiledModel, position) -> dict[str, Any]:
    """Flat unconstrained ``position[..., dim]`` -> {value variable name: array}."""
    lead = position.shape[:-1]
    return {
        name: position[..., sl].reshape(lead + shape)
        for name, (sl, shape) in compiled.value_slices.items()
    }


def container_names(model) -> Sequence[str]:
    """Names of the model's ``pm.Data`` containers."""
    return list(_container_map(model))


def graph_fingerprint(model) -> str:
    """SHA-256 of a canonical text of ``model``'s log density and Deterministics graphs.

    The text is PyTensor's ``debugprint`` (operations, types and names, with ids assigned in
    order of appearance, so never object ids), followed by the bytes of every constant and the
    value of every shared variable in the graph (``debugprint`` abbreviates arrays). Two builds
    of the same template give the same hash; a changed parameter (e.g. Student-t's ``nu``), an
    added term or an edited custom template gives another. Used to key stored results.
    """
    import hashlib

    from pytensor.graph.basic import Constant
    from pytensor.printing import debugprint

    outputs = [model.logp(), *model.deterministics]
    digest = hashlib.sha256(debugprint(outputs, file="str", print_type=True).encode())
    for var in ancestors(outputs):
        if isinstance(var, Constant):
            value = np.asarray(var.data)
        elif isinstance(var, SharedVariable):
            value = np.asarray(var.get_value(borrow=True))
        else:
            continue
        digest.update(f"{var.name}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]
