"""Two threads sharing a list of items without atomics: each claims items from its own end.

A thread pool that must not spin (shared cores) wakes its worker tens of microseconds after
the launch, and a static split makes the caller wait for the late half. Claiming instead lets
the caller start at once and the worker take what is left when it arrives: the split follows
the threads' actual speed, not a prediction. Used by the dynamic kernels
(:mod:`codegen.cpu_dynamic`, per gate group and output block) and the static block-row kernels
(:mod:`codegen.cpu`, per chunk of block rows). An item's work must write the same values when
two threads both do it (plain stores, no accumulation into shared memory).
"""

from __future__ import annotations

from tvm.script import tirx as T

#: int32 slots between two claim flags: a cache line each, so that claiming an item does not
#: take the line holding the other thread's next flags away from it.
CLAIM_STRIDE = 16


def claim_macro(n: int, do):
    """A macro ``(t, taken, mark, args)`` running ``do(item, args)`` on the items ``range(n)`` that
    thread ``t`` of two claims: from the front (t = 0) or the back (t = 1), each taken by writing
    ``mark`` to its plain int32 flag ``taken[item * CLAIM_STRIDE]`` first, until one the other
    thread took (its flag already ``mark``). Two threads taking one item at once both do it and
    write the same values. The first thread awake, or the faster one, does more: the split follows
    the threads' actual speed, not a prediction of the work. ``mark`` differs from every value
    ``taken`` held before (1 after zeroing; the step number + 1 in a time loop, with no reset per
    step). ``taken`` holds at least :func:`flag_slots` ``(n)`` int32, item ``i``'s flag at ``i * CLAIM_STRIDE``."""
    stride = CLAIM_STRIDE

    @T.macro
    def run(t, taken, mark, args):
        stp = T.alloc_buffer((1,), "int32")
        stp[0] = 0
        for i in T.serial(n):
            item = T.Bind(T.if_then_else(t == 0, i, n - 1 - i))
            if stp[0] == 0:
                if taken[item * stride] != mark:
                    taken[item * stride] = mark
                    do(item, args)
                else:
                    stp[0] = 1

    return run


def flag_slots(n: int) -> int:
    """int32 slots holding the flags of ``n`` items: ``(n - 1) * CLAIM_STRIDE + 1`` (16 items: 241
    slots, 964 bytes; TVM keeps a buffer on the stack only below 1 KiB, a larger one is a
    workspace allocated per call)."""
    return (n - 1) * CLAIM_STRIDE + 1


def clear_flags(n: int):
    """A macro ``(taken)`` zeroing the flags of ``n`` items (``taken``: :func:`flag_slots` int32)."""

    @T.macro
    def clear(taken):
        for i in T.serial(n):
            taken[i * CLAIM_STRIDE] = 0

    return clear


def claimed_launch(n: int, do):
    """A macro ``(args)``: one thread-pool launch in which two threads claim the items
    ``range(n)`` (:func:`claim_macro`, flags zeroed first)."""
    claim, clear = claim_macro(n, do), clear_flags(n)

    @T.macro
    def run(args):
        taken = T.alloc_buffer((flag_slots(n),), "int32")
        clear(taken)
        for t in T.parallel(2):
            claim(t, taken, 1, args)

    return run
