"""Gradient checkpointing layer by layer: which layers recompute their forward in the backward.

Recomputing a decoder layer's forward costs a third of that layer's compute and keeps, of its
activations, only its input. A run whose micro-batch does not fit without checkpointing needs
only some layers to recompute: the others keep what their backward needs and skip the recompute
(`expert.train.memory` finds how many, `fewest`). The first layers are the ones that recompute:
the backward reaches the last ones first and frees what they kept before it recomputes any.
transformers' own `every_n_layers` leaves out every n-th layer; a count fills the memory more
closely.
"""

from __future__ import annotations

import torch


def set_checkpointing(model, on: bool, layers: int | None = None) -> None:
    """Switch non-reentrant gradient checkpointing of the (PEFT-wrapped) model on or off; `layers`:
    how many decoder layers recompute, the first ones (None: all)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _drop_input_grad_hooks(base)  # PEFT's, if it wrapped a checkpointing model
    if on:
        kwargs = {"use_reentrant": False}  # needs no input grads and replays dropout's RNG exactly
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if layers is not None:
            for index, layer in enumerate(decoder_layers(base)):
                layer.gradient_checkpointing = index < layers
        _drop_input_grad_hooks(base)  # the enable's own
    elif is_checkpointing(base):
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()


def _drop_input_grad_hooks(base) -> None:
    """Remove the forward hook that makes the embeddings' output require grad. transformers' enable
    adds one each time (and its disable removes none under PEFT), PEFT's wrapping of a checkpointing
    model another; reentrant checkpointing needs it, ours does not. Left in, every backward also
    ran through the first layer's frozen weights down to the embeddings, even with checkpointing
    off again after the planner's probes. transformers keeps only the latest enable's hooks, so
    this runs before and after each."""
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()


def recompute(model, layers: int, every: int) -> None:
    """`layers` of `every` decoder layers recompute (0: checkpointing off)."""
    set_checkpointing(model, layers > 0, layers if layers < every else None)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The layers that checkpointing switches one by one (transformers' GradientCheckpointingLayer),
    in order; none for a model whose layers predate that class (then it is all or nothing)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def is_checkpointing(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def fewest(every: int, ok, guess=None) -> int:
    """The fewest layers to recompute, of `every`, for which ok(layers) holds (it holds for `every`,
    and for every count above one it holds for): none, else by bisection. Asks about one layer
    fewer first, so a micro-batch that needs them all costs one more probe, not a bisection.

    With a guess, also about two fewer before it: with one fewer the last layer keeps what its
    backward would recompute first anyway, so that peak is about the one with all (measured), and
    only the second layer left out shows what each adds (a guess from the first two gave nothing).
    Then about guess() and up to two counts next to it toward the answer (a probe of a big model
    takes seconds, and the peak grows by about the same with each layer left out: a guess from
    two peaks is seldom far off, and a right one costs two probes)."""
    if ok(0):
        return 0
    if every == 1 or not ok(every - 1):
        return every
    low, high = 1, every - 1  # ok(high) holds, ok(low - 1) does not
    if guess and every > 2:
        if not ok(every - 2):
            return every - 1
        high = every - 2
    start = guess() if guess and low < high else None
    if start is not None:  # from the guess (kept within the bounds) a layer at a time, two steps at most
        start = max(low, min(start, high - 1))
        if ok(start):
            high = start
            for count in (start - 1, start - 2):
                if count < low:
                    break
                if not ok(count):
                    low = count + 1
                    break
                high = count
        else:
            low = start + 1
            for count in (start + 1, start + 2):
                if count >= high:
                    break
                if ok(count):
                    high = count
                    break
                low = count + 1
    while low < high:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle + 1
    return low
