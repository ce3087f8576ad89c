"""The fast routing kernels behind :mod:`capsnet.functional` (private).

These compute the same equations as :mod:`capsnet.functional.reference` (the tests hold
them equal, and equal to float64 loops) with three changes that only affect speed and
memory:

* Parent-major layout. Votes are routed as ``(G, O, I, D)`` (G = all batch dims): every
  sum over children ``i`` and every sum over pose entries ``d`` is then one batched
  matrix-vector product (``bmm``) on contiguous memory, with no transposed copies. The
  public layout ``(..., I, O, D)`` is converted once on entry; the conversion is free when
  the caller already stores votes parent-major (a transposed view of ``(..., O, I, D)``).
* Buffers. Large temporaries are written into a few vote-sized work buffers that are
  reused across iterations (on CPU a freshly allocated large tensor costs page faults).
* Hand-written backward passes (``torch.autograd.Function``). Autograd would store
  several vote-sized intermediates per routing iteration; these store the votes once,
  plus the couplings / assignments of each iteration (1/D of the votes' size) and a few
  per-parent statistics, and recompute ``V - mu`` when needed. The derivations follow the
  forward equations line by line (comments name the forward quantity being differentiated).

Files: :mod:`.dynamic` (dynamic routing), :mod:`.em` (EM routing: the M-step and E-step
that train, the chunked forward and the backward pass), :mod:`.conv` (a convolutional
matrix-capsule layer's votes fused with its EM routing), :mod:`.chunking` (how many
examples EM routing works on at a time, per device). Nothing here checks arguments:
the public functions do, then call in.
"""
