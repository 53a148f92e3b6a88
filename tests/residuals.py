"""What a function's backward keeps from its forward: the leaves of `jax.vjp`'s closure, by shape (nothing runs)."""

import jax


def kept_for_backward(f, *args) -> list[jax.ShapeDtypeStruct]:
    """The residuals of f at args: one ShapeDtypeStruct per array the backward pass keeps (parameters included)."""
    return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))
