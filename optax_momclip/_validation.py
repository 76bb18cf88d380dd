"""Argument and tree-structure checks shared by every factory."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

_ORDS = (1, 2, math.inf)


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  return float(np.asarray(value))


def _describe(value: Any) -> str:
  if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic):
    return f"{type(value).__name__} of dtype {value.dtype}"
  return f"{value!r} ({type(value).__name__})"


def _is_real_number(value: Any) -> bool:
  """A Python number, NumPy scalar or 0-d array of an integer or float dtype (bf16 included)."""
  if isinstance(value, bool | np.bool_):
    return False
  if hasattr(value, "dtype"):
    dtype = jnp.dtype(value.dtype)
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
  return isinstance(value, numbers.Real)


def check_scalar(
  fn: str,
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  schedule: bool = False,
  infinite: bool = False,
) -> None:
  """Checks a numeric hyperparameter at construction.

  Accepts Python numbers, NumPy scalars and 0-d arrays of any integer or
  float dtype, bf16 included (traced ones pass unchecked, so
  ``optax.inject_hyperparams`` works), and callables when ``schedule`` is
  true. The allowed range is ``[low, high]``, with either end open when
  ``low_open`` / ``high_open``; infinite values only when ``infinite``.

  Raises:
    TypeError: ``value`` is not a real number, a 0-d array or (if allowed) a callable.
    ValueError: ``value`` is NaN, infinite (unless allowed) or out of range.
  """
  if schedule and callable(value):
    return
  kinds = "a real number, a 0-d array" + (" or a schedule" if schedule else "")
  if hasattr(value, "shape") and tuple(value.shape) != ():
    raise TypeError(f"{fn}: {name} must be {kinds}, got an array of shape {tuple(value.shape)}")
  if not _is_real_number(value):
    raise TypeError(f"{fn}: {name} must be {kinds}, got {_describe(value)}")
  v = concrete_float(value)
  if v is None:
    return
  lo = "-inf" if low is None else f"{low:g}"
  hi = "inf" if high is None else f"{high:g}"
  left = "[" if low is not None and not low_open else "("
  left = "[" if low is None and infinite else left
  right = "]" if (high is not None and not high_open) or (high is None and infinite) else ")"
  valid = f"{left}{lo}, {hi}{right}"
  too_low = low is not None and (v <= low if low_open else v < low)
  too_high = high is not None and (v >= high if high_open else v > high)
  if math.isnan(v) or too_low or too_high or (math.isinf(v) and not infinite):
    raise ValueError(f"{fn}: {name} must be in {valid}, got {value!r}")


def inner_transformation(fn: str, inner: Any) -> optax.GradientTransformationExtraArgs:
  """A wrapper's ``inner`` as a transformation that takes extra arguments.

  Takes what ``optax.chain`` takes: a ``GradientTransformation``, an
  ``optax.MultiSteps`` (through its ``gradient_transformation()``, which
  passes extra arguments on) or any object with ``init`` and ``update``
  (given none).

  Raises:
    TypeError: naming ``fn``, for an object with neither.
  """
  if not isinstance(inner, optax.GradientTransformation):
    convert = getattr(inner, "gradient_transformation", None)
    if callable(convert):
      inner = convert()
    elif callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None)):
      inner = optax.GradientTransformation(inner.init, inner.update)
    else:
      raise TypeError(
        f"{fn}: inner must be an optax.GradientTransformation (or have init and update, as "
        f"optax.MultiSteps), got {type(inner).__name__}"
      )
  return optax.with_extra_args_support(inner)


def check_bool(fn: str, name: str, value: Any) -> None:
  """Checks a flag is a bool (a string such as ``"False"`` would read as true)."""
  if not isinstance(value, bool | np.bool_):
    raise TypeError(f"{fn}: {name} must be True or False, got {_describe(value)}")


def check_order(fn: str, lower_name: str, lower: Any, upper_name: str, upper: Any) -> None:
  """Checks ``lower <= upper`` when both are concrete numbers."""
  if callable(lower) or callable(upper) or lower is None or upper is None:
    return
  lo, hi = concrete_float(lower), concrete_float(upper)
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(
      f"{fn}: {lower_name} must be <= {upper_name}, got {lower_name}={lower!r} > "
      f"{upper_name}={upper!r}"
    )


def check_ord(fn: str, ord: Any) -> float:
  """Checks a norm order: None (the default, 2, as NumPy's), 1, 2 or inf; returns it as a number.

  None is the default so that ``optax.inject_hyperparams``, which turns numeric
  defaults into arrays, leaves it alone: an order picks a code path.
  """
  if ord is None:
    return 2
  if isinstance(ord, jax.core.Tracer) or (hasattr(ord, "shape") and tuple(ord.shape) != ()):
    raise TypeError(
      f"{fn}: ord picks a code path, so it must be None, 1, 2 or inf, got {_describe(ord)}; "
      "with optax.inject_hyperparams pass static_args=('ord',)"
    )
  if not _is_real_number(ord) or float(ord) not in _ORDS:
    raise ValueError(f"{fn}: ord must be None, 1, 2 or inf, got {ord!r}")
  return float(ord) if math.isinf(float(ord)) else int(ord)


def check_choice(fn: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  """Checks ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{fn}: {name} must be one of {tuple(choices)!r}, got {value!r}")


def check_axis_name(fn: str, axis_name: Any) -> None:
  """Checks a mapped-axis name: None, a string, or a tuple of strings."""
  ok = (
    axis_name is None
    or isinstance(axis_name, str)
    or (isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name))
  )
  if not ok:
    raise TypeError(
      f"{fn}: axis_name must be None, a string or a tuple of strings, got {axis_name!r}"
    )


def check_axes(fn: str, name: str, axis: Any) -> None:
  """Checks an array-axis argument: None, an int, or a tuple of ints."""
  ok = (
    axis is None
    or (isinstance(axis, int) and not isinstance(axis, bool))
    or (
      isinstance(axis, tuple)
      and axis
      and all(isinstance(a, int) and not isinstance(a, bool) for a in axis)
    )
  )
  if not ok:
    raise TypeError(f"{fn}: {name} must be None, an int or a tuple of ints, got {axis!r}")
  if isinstance(axis, tuple) and len(set(axis)) != len(axis):
    raise ValueError(f"{fn}: {name} must name each axis once, got {axis!r}")


def check_positive_int(fn: str, name: str, value: Any, *, low: int = 1) -> int:
  """Checks an integer hyperparameter that fixes a shape is at least ``low``; returns it.

  Python and NumPy integers and concrete 0-d integer arrays are accepted; a
  traced one cannot fix a shape.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{fn}: {name} fixes a shape, so it must be a concrete int, got a traced value; with "
      f"optax.inject_hyperparams pass static_args=('{name}',)"
    )
  integral = hasattr(value, "dtype") and jnp.issubdtype(jnp.dtype(value.dtype), jnp.integer)
  if isinstance(value, bool | np.bool_) or not (isinstance(value, numbers.Integral) or integral):
    raise TypeError(f"{fn}: {name} must be an int, got {_describe(value)}")
  if hasattr(value, "shape") and tuple(value.shape) != ():
    raise TypeError(f"{fn}: {name} must be an int, got an array of shape {tuple(value.shape)}")
  if int(value) < low:
    raise ValueError(f"{fn}: {name} must be >= {low}, got {value!r}")
  return int(value)


def check_count(fn: str, name: str, value: Any, *, low: int = 1) -> None:
  """Checks a count >= ``low`` that does not fix a shape, so it may be a traced 0-d array.

  ``optax.inject_hyperparams`` turns integer arguments into arrays; those are
  range-checked when concrete.
  """
  if hasattr(value, "shape") and not isinstance(value, np.generic):
    check_scalar(fn, name, value, low=float(low))
  else:
    check_positive_int(fn, name, value, low=low)


def check_dtype(fn: str, name: str, dtype: Any) -> None:
  """Checks an optional floating dtype argument such as ``accumulator_dtype``."""
  if dtype is None:
    return
  if hasattr(dtype, "shape"):
    raise TypeError(f"{fn}: {name} must be None or a floating dtype, got an array {dtype!r}")
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)  # np.floating misses bfloat16
  except TypeError:
    ok = False
  if not ok:
    raise TypeError(f"{fn}: {name} must be None or a floating dtype, got {dtype!r}")


def _dtype(x: Any) -> Any:
  dtype = getattr(x, "dtype", None)  # an array's; a Python number's as jnp would make it
  return jnp.result_type(x) if dtype is None else dtype


@functools.cache
def _inexact(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def check_gradients(fn: str, updates: Any) -> None:
  """Refuses, at trace time, an update leaf that is not floating or complex.

  Scaled or averaged, an integer gradient would be rounded back to its dtype:
  a clip of ``[3, 4]`` to norm 1 would come out ``[0, 0]``.

  Raises:
    TypeError: naming ``fn``, the leaf's path and its dtype.
  """
  if all(_inexact(_dtype(x)) for x in jax.tree.leaves(updates)):
    return  # the common case, cheap enough for every eager call
  for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
    dtype = _dtype(x)
    if not _inexact(dtype):
      raise TypeError(
        f"{fn}: updates{jax.tree_util.keystr(path)} has dtype {dtype}; gradients must be "
        "floating or complex (an integer one would be rounded after scaling): cast it, "
        "or leave it out with optax.masked"
      )


def _paths(tree: Any) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return [jax.tree_util.keystr(path) for path, _ in leaves]


def check_tree_matches(
  fn: str,
  updates: Any,
  state_tree: Any,
  *,
  shape_of: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape,
) -> None:
  """Asserts at trace time that ``updates`` has the structure and shapes of the state.

  ``shape_of`` maps an update leaf's shape to the shape its state leaf must
  have (the identity for momentum buffers, the reduced shape for norms).

  Raises:
    AssertionError: through chex, naming ``fn`` and the first mismatching path.
  """
  up_paths, st_paths = _paths(updates), _paths(state_tree)
  if up_paths != st_paths:
    only_up = [p for p in up_paths if p not in st_paths]
    only_st = [p for p in st_paths if p not in up_paths]
    detail = (
      f"{fn}: the updates do not have the structure of the state "
      f"(only in updates: {only_up[:3]}, only in state: {only_st[:3]})"
    )
    chex.assert_trees_all_equal_structs(updates, state_tree, custom_message=detail)
    raise AssertionError(detail)  # same leaves in another container type
  pairs = zip(
    jax.tree_util.tree_flatten_with_path(updates)[0],
    jax.tree.leaves(state_tree),
    strict=True,
  )
  for (path, u), s in pairs:
    want = tuple(shape_of(tuple(jnp.shape(u))))
    if want != tuple(jnp.shape(s)):
      chex.assert_shape(
        s,
        want,
        custom_message=(
          f"{fn}: updates{jax.tree_util.keystr(path)}: shape {tuple(jnp.shape(u))} does not "
          f"match the state's {tuple(jnp.shape(s))}"
        ),
      )


ScheduleOrScalar = float | jax.Array | Callable[[jax.Array], jax.Array]
