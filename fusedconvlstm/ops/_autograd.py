"""Autograd registration of the package's ops that behaves the same on every supported torch.

The dispatcher drops trailing arguments equal to their schema defaults before autograd sees them,
so a backward gets fewer inputs than the schema has whenever a call passes defaults (or leaves them
out). torch 2.14 accepts one gradient per schema argument and cuts the list itself; torch 2.11 to
2.13 insist on exactly one per input received. ``register_autograd`` lets each backward be written
for the full schema and returns, on every torch, one gradient per input autograd received.
"""

from __future__ import annotations

from collections.abc import Callable


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, where ``backward`` returns
    one gradient (or ``None``) per schema argument of the ``torch.library.custom_op`` ``op``."""
    schema = op._opoverload._schema
    n_args = len(schema.arguments)

    def backward_received(ctx, *grads):
        out = tuple(backward(ctx, *grads))
        if len(out) != n_args:
            raise RuntimeError(f"{schema.name}: backward returned {len(out)} gradients for {n_args} arguments")
        # needs_input_grad has one entry per input autograd received (a tensor list is one entry).
        received = len(ctx.needs_input_grad)
        if any(g is not None for g in out[received:]):
            raise RuntimeError(f"{schema.name}: a gradient for a defaulted argument that autograd did not receive")
        return out[:received]

    op.register_autograd(backward_received, setup_context=setup_context)
