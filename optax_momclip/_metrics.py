"""Reading the statistics kept in optimizer states, and value checks for debugging."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class _Stats:
  name: str
  fields: tuple[str, ...]
  fractions: Mapping[str, tuple[str, str]]
  summaries: tuple[str, ...] = ()
  infinite: tuple[str, ...] = ()  # fields whose +inf is a documented value (see allow_infinite)


_REGISTRY: dict[type, _Stats] = {}
_FRACTIONS = {"clip_fraction": ("steps_clipped", "count")}


def register_statistics(
  state_type: type,
  name: str,
  fields: Sequence[str],
  *,
  fractions: Mapping[str, tuple[str, str]] | None = None,
  summaries: Sequence[str] = (),
) -> None:
  """Declares the statistics a state type keeps, so that `metrics` reports them.

  Every transformation of this library registers its state; register your
  own to have `metrics` find it in any optimizer state. Its statistics are
  then reported as ``"<name>/<field>"`` (a field holding a tree of arrays
  gives one key per leaf path), and its other fields (an ``inner_state``)
  are searched for registered states in turn.

  Args:
    state_type: the state's class, usually a ``NamedTuple`` or a dataclass.
    name: the key prefix, usually the factory's name.
    fields: the attributes that are statistics.
    fractions: derived keys, ``{key: (numerator, denominator)}`` of counter
      fields, reported as ``numerator / max(denominator, 1)``. Default:
      ``clip_fraction = steps_clipped / count`` where both are fields.
    summaries: fields holding one statistic per leaf (a tree of arrays) that
      are reported as three keys, ``"<name>/<field>_min"``, ``_mean`` and
      ``_max`` over all their elements, instead of one key per leaf: for
      large models. Default none.

  Returns:
    None; registering the same type again replaces its entry.

  Raises:
    ValueError: a field (or summary) the state type does not have, for a
      ``NamedTuple`` or dataclass state (``flax.struct.dataclass`` included).

  Examples:
    >>> from typing import NamedTuple
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> class TraceNormState(NamedTuple):
    ...   trace_norm: jnp.ndarray
    >>> omc.register_statistics(TraceNormState, "trace_norm", ["trace_norm"])
    >>> tx = optax.GradientTransformation(
    ...   lambda p: TraceNormState(jnp.zeros([])),
    ...   lambda g, s, p=None: (g, TraceNormState(omc.global_norm(g))),
    ... )
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
    >>> print(omc.metrics(state))
    {'trace_norm/trace_norm': Array(5., dtype=float32)}
  """
  known = _field_names_of_type(state_type)
  if known is not None:
    for field in (*fields, *summaries):
      if field not in known:
        raise ValueError(
          f"register_statistics: {state_type.__name__} has no field {field!r}; its fields are "
          f"{known}"
        )
  if fractions is None:
    fractions = {k: v for k, v in _FRACTIONS.items() if set(v) <= set(fields)}
  _REGISTRY[state_type] = _Stats(name, tuple(fields), dict(fractions), tuple(summaries))


def _field_names_of_type(state_type: type) -> tuple[str, ...] | None:
  """The fields of a NamedTuple or dataclass type; None for another kind of class."""
  if dataclasses.is_dataclass(state_type):
    return tuple(f.name for f in dataclasses.fields(state_type))
  names = getattr(state_type, "_fields", None)
  return tuple(names) if isinstance(names, tuple) else None


def _fields(node: Any) -> tuple[str, ...]:
  return _field_names_of_type(type(node)) or ()


def _replaced(node: Any, **changes: Any) -> Any:
  """``node`` with ``changes``: a NamedTuple's ``_replace``, a dataclass's ``replace``."""
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    return dataclasses.replace(node, **changes)
  return node._replace(**changes)


def allow_infinite(state_type: type, *fields: str) -> None:
  """Lets `with_value_checks` accept +inf (never NaN) in these fields of a registered state:
  a documented value, not corruption (adagc's γ before any finite norm)."""
  _REGISTRY[state_type] = dataclasses.replace(_REGISTRY[state_type], infinite=fields)


def _is_stats_node(x: Any) -> bool:
  return type(x) in _REGISTRY


def _subkey(path: tuple[Any, ...]) -> str:
  # flax.nnx wraps each optimizer-state array in a Variable whose child is `.value`.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _scope(path: tuple[Any, ...]) -> str:
  """The names on the way to a state: the string keys of the dicts it sits in.

  ``optax.named_chain`` and ``optax.multi_transform`` keep their states in
  dicts keyed by the names and labels you gave; positions in an
  ``optax.chain`` are left out, so adding a transformation to a chain
  changes no key.
  """
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
  return "".join(f"{n}/" for n in names)


def _stats_nodes(opt_state: Any) -> list[tuple[str, Any]]:
  """Each registered state in ``opt_state`` with its key prefix, in tree order.

  The fields of a registered state that are not statistics (a wrapper's
  ``inner_state``) are searched too, after the state itself. A second state
  of the same name in the same scope gets ``_1``, a third ``_2``, and so on.
  """
  seen: dict[str, int] = {}
  out = []

  def visit(tree: Any, scope: str) -> None:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stats_node)[0]
    for path, node in flat:
      if not _is_stats_node(node):
        continue
      spec = _REGISTRY[type(node)]
      key = scope + _scope(path) + spec.name
      n = seen.get(key, 0)
      seen[key] = n + 1
      out.append((key if n == 0 else f"{key}_{n}", node))
      stats = (*spec.fields, *spec.summaries)
      rest = {f: getattr(node, f) for f in _fields(node) if f not in stats}
      visit(list(rest.values()), scope + _scope(path))

  visit(opt_state, "")
  return out


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Every statistic kept in an optimizer state, as a flat dict of arrays.

  Finds the states of this library's transformations (and of any state
  type given to `register_statistics`) at any depth: ``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``masked``, ``multi_transform``,
  ``named_chain``, `skip_bad_steps`, ``flax.nnx.Optimizer``'s state. Returns
  ``{"<transform>/<field>": value}`` with a derived
  ``<transform>/clip_fraction = steps_clipped / max(count, 1)``.

  The keys are stable: a transformation's key is its name, preceded by the
  names of the ``optax.named_chain`` entries or ``multi_transform`` labels
  it sits under (``"encoder/clip_by_global_norm/grad_norm"``); positions in
  an ``optax.chain`` are not part of it, so adding or moving other
  transformations changes no key. Only a second instance of the same
  transformation under the same names is numbered, ``<transform>_1``, in
  tree order; give it a name with ``optax.named_chain`` to fix its key.
  Statistics kept per leaf (`clip_by_norm`) get one key per leaf path, the
  largest value over a leaf's slices (none for a zero-size leaf); those
  registered as summaries (`adagc`'s per-tensor ``gamma``) get three keys,
  ``<field>_min``, ``_mean`` and ``_max``. A state batched by ``jax.vmap``
  (an ensemble of optimizers; the leading axes of its ``count``) gives each
  value per member: those maxima and summaries are taken over each member's
  own elements. Reads
  only what the state holds: no norm is recomputed, and it is safe inside
  ``jit``.

  Args:
    opt_state: an optimizer state (any pytree).

  Returns:
    A dict from stable string keys to scalars (int32 counters, float32 statistics).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_momclip as omc
    >>> tx = optax.chain(omc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(g, tx.init(g))
    >>> m = omc.metrics(state)
    >>> print(m["clip_by_global_norm/grad_norm"], m["clip_by_global_norm/clip_fraction"])
    5.0 1.0
  """
  out: dict[str, jax.Array] = {}
  for name, node in _stats_nodes(opt_state):
    spec = _REGISTRY[type(node)]
    batch = _batch_ndim(node)
    values = {}
    for field in spec.fields:
      flat = jax.tree_util.tree_flatten_with_path(getattr(node, field))[0]
      if len(flat) == 1 and not _subkey(flat[0][0]):
        values[field] = flat[0][1]
        out[f"{name}/{field}"] = flat[0][1]
        continue
      for path, leaf in flat:  # a statistic kept per leaf; a zero-size leaf has none
        if math.prod(jnp.shape(leaf)[batch:]):
          out[f"{name}/{field}/{_subkey(path)}"] = jnp.max(_per_member(leaf, batch), axis=-1)
    for field in spec.summaries:
      out.update(_summary(f"{name}/{field}", getattr(node, field), batch))
    for key, (num, den) in spec.fractions.items():
      if num in values and den in values:
        denom = jnp.maximum(values[den], 1).astype(jnp.float32)
        out[f"{name}/{key}"] = values[num].astype(jnp.float32) / denom
  return out


def _batch_ndim(node: Any) -> int:
  """How many leading axes ``jax.vmap`` added to a state: those of its scalar ``count``."""
  count = getattr(node, "count", None) if "count" in _fields(node) else None
  return jnp.ndim(count) if count is not None else 0


def _per_member(x: Any, batch: int) -> jax.Array:
  """``x`` as ``(*batch shape, elements)``: each ensemble member's elements in one row."""
  x = jnp.asarray(x)
  return x.reshape(*x.shape[:batch], -1)


def _summary(key: str, tree: Any, batch: int = 0) -> dict[str, jax.Array]:
  """Min, mean and max over every element of a tree of arrays (none for an empty tree).

  Per member of a batched state: over all but the ``batch`` leading axes.
  """
  leaves = [_per_member(x, batch) for x in jax.tree.leaves(tree)]
  leaves = [x for x in leaves if x.shape[-1]]
  if not leaves:
    return {}
  values = jnp.concatenate(leaves, axis=-1)  # one value per leaf: a few hundred at most
  return {
    f"{key}_min": jnp.min(values, axis=-1),
    f"{key}_mean": jnp.mean(values, axis=-1),
    f"{key}_max": jnp.max(values, axis=-1),
  }


def _check(assertion: Callable[[], None]) -> None:
  """Runs a chex value assertion; under ``jit`` without ``chex.chexify`` it is skipped."""
  try:
    assertion()
  except RuntimeError as e:
    if "chexify" not in str(e):
      raise


# Statistics that record the incoming updates and loss: NaN there is a fact about the input
# (say, a step skip_bad_steps skipped), not a corrupted optimizer state. Norms are >= 0.
_INPUT_NORMS = ("grad_norm",)
_INPUTS = (*_INPUT_NORMS, "loss")


def _state_proper(tree: Any) -> Any:
  """``tree`` without the input fields of registered states (at any depth), and with the
  +inf a field may hold (see `allow_infinite`) read as 0."""

  def strip(node: Any) -> Any:
    if not _is_stats_node(node) or not _fields(node):  # a class of another kind: as it is
      return node
    infinite = _REGISTRY[type(node)].infinite
    finite = lambda x: jnp.where(jnp.isposinf(x), jnp.zeros_like(x), x)
    return _replaced(
      node,
      **{
        f: None
        if f in _INPUTS
        else jax.tree.map(finite, getattr(node, f))
        if f in infinite
        else _state_proper(getattr(node, f))
        for f in _fields(node)
      },
    )

  return jax.tree.map(strip, tree, is_leaf=_is_stats_node)


def _float_leaves(tree: Any) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def with_value_checks(
  tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Adds chex value assertions to ``tx.update``: finite updates and state, norms >= 0.

  The recorded norms of the incoming updates (``grad_norm``) and the
  recorded loss may be NaN, since a NaN input that `skip_bad_steps` skipped
  is not an error, and `adagc`'s ``gamma`` is +inf until its tensor has had
  a finite norm; everything else in the state must be finite.
  Inside a step wrapped in ``chex.chexify`` (or run eagerly) a violation raises
  an ``AssertionError`` naming the check; in a plain ``jit`` the checks are
  skipped and cost nothing.

  Args:
    tx: any gradient transformation.

  Returns:
    ``tx`` with the same state, whose update asserts after each step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_momclip as omc
    >>> tx = omc.with_value_checks(omc.clip_by_global_norm(1.0))
    >>> g = {"w": jnp.array([jnp.nan, 1.0])}
    >>> try:
    ...   tx.update(g, tx.init(g))
    ... except AssertionError as e:
    ...   print("caught:", "non-finite" in str(e))
    caught: True
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    _check(
      lambda: chex.assert_tree_all_finite(
        new_updates, custom_message="with_value_checks: non-finite updates"
      )
    )
    _check(
      lambda: chex.assert_tree_all_finite(
        _float_leaves(_state_proper(new_state)),
        custom_message="with_value_checks: non-finite state",
      )
    )
    norms = {
      k: ~(v < 0)  # NaN passes: see above
      for k, v in metrics(new_state).items()
      if any(f"/{f}" in k for f in _INPUT_NORMS)
    }
    if norms:
      _check(
        lambda: chex.assert_trees_all_equal(
          norms,
          {k: jnp.ones_like(v) for k, v in norms.items()},
          custom_message="with_value_checks: a grad_norm is negative",
        )
      )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
