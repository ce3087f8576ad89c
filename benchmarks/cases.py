"""Benchmark cases: what is timed, on which sizes, and the FLOP counts used for GFLOP/s.

A case is a plain dict (so it can be passed to a worker subprocess as JSON):

* ``kind``: ``"train"`` (forward + backward + Adam step of a whole model), ``"infer"``
  (forward under ``torch.inference_mode``) or ``"routing"`` (one routing call forward +
  backward of the sum of its outputs, on fixed random inputs).
* ``model`` / ``model_kwargs`` / ``batch`` / ``input_size`` for model cases; ``routing``
  and ``shape`` for routing cases.
* ``amp``: ``"fp32"`` or ``"bf16"`` (``torch.autocast("cpu", torch.bfloat16)`` around the
  forward pass and the loss).
* ``compile``: wrap capsnet's model (or routing function) in ``torch.compile``; the
  reference stays eager.
* ``checkpoint``: build capsnet's model with ``checkpoint=True`` (recompute votes and routing
  of each capsule layer in the backward pass), when the layers support it.
* ``device``: where models and inputs are built (``"cpu"`` unless set; ``run.py --device``
  sets it on every case). bf16 autocast then runs on that device type.

Every case builds two implementations: ``capsnet`` (the public API) and ``reference`` (the
straightforward code in :mod:`reference`), with identical weights and inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

import capsnet.functional as CF
import reference
from capsnet.models import create, model_info

IMPLS = ("capsnet", "reference")


def _case(name: str, **kw) -> dict:
    base = {
        "name": name,
        "amp": "fp32",
        "compile": False,
        "checkpoint": False,
        "repeats": 7,
        "warmup": 2,
    }
    base.update(kw)
    return base


def _matrix(preset: str, size: int, iterations: int, batch: int, **kw) -> dict:
    classes = 5 if preset == "paper" else 10  # paper size = smallNORB (5 classes)
    tag = f"matrix_{preset}_{size}_it{iterations}"
    kind = kw.pop("kind", "train")
    name = kw.pop("name", f"{tag}_b{batch}_{kind}")
    return _case(
        name,
        kind=kind,
        model="matrix_capsnet",
        batch=batch,
        input_size=size,
        model_kwargs={
            "preset": preset,
            "iterations": iterations,
            "num_classes": classes,
            "input_size": size,
            # reference.py computes the paper's EM maths: compare like with like
            "variant": kw.pop("variant", "paper"),
        },
        **kw,
    )


def _sabour(batch: int, **kw) -> dict:
    kind = kw.pop("kind", "train")
    name = kw.pop("name", f"capsnet_mnist_b{batch}_{kind}")
    return _case(
        name,
        kind=kind,
        model="capsnet",
        batch=batch,
        input_size=28,
        model_kwargs={"iterations": 3},
        **kw,
    )


# Shapes that the paper-size matrix capsnet (32x32, batch 32, 5 classes) routes:
# ConvCaps1: 6x6 parents, 3*3*32 children each, 32 types; class capsules: 4*4*32 -> 5.
CONVCAPS1_PAPER = {
    "shape": [32, 36, 288, 32, 16],
    "in_size": [14, 14],
    "kernel_size": 3,
    "stride": 2,
}
CLASSCAPS_PAPER = {"shape": [32, 512, 5, 16]}


def full_cases() -> list[dict]:
    """The suite that ``run.py`` runs by default (see RESULTS.md)."""
    return [
        # Routing alone
        _case(
            "dynamic_routing_128x1152x10x16",
            kind="routing",
            routing="dynamic",
            shape=[128, 1152, 10, 16],
            iterations=3,
        ),
        _case(
            "dynamic_routing_128x1152x10x16_bf16",
            kind="routing",
            routing="dynamic",
            shape=[128, 1152, 10, 16],
            iterations=3,
            amp="bf16",
        ),
        _case(
            "em_convcaps1_paper",
            kind="routing",
            routing="conv_em",
            iterations=3,
            repeats=3,
            warmup=1,
            **CONVCAPS1_PAPER,
        ),
        _case("em_classcaps_paper", kind="routing", routing="em", iterations=3, **CLASSCAPS_PAPER),
        _case(
            "em_classcaps_paper_bf16",
            kind="routing",
            routing="em",
            iterations=3,
            amp="bf16",
            **CLASSCAPS_PAPER,
        ),
        # Sabour CapsNet
        _sabour(128),
        _sabour(128, amp="bf16", name="capsnet_mnist_b128_train_bf16", repeats=3),
        _sabour(256, kind="infer"),
        # Matrix capsules
        _matrix("small", 28, 3, 32),
        # The model's default EM variant (the reference still computes the paper's maths,
        # so "agree" is not a check here): issue 11's "within 10 % of the paper variant".
        _matrix(
            "small", 28, 3, 32, variant="capsnet", name="matrix_small_28_it3_b32_train_capsnet"
        ),
        _matrix("small", 28, 2, 32),
        _matrix("small", 32, 3, 32),
        _matrix("small", 32, 2, 32),
        _matrix("small", 28, 3, 32, amp="bf16", name="matrix_small_28_it3_b32_train_bf16"),
        _matrix("small", 28, 3, 256, kind="infer"),
        _matrix("paper", 32, 3, 32, repeats=3, warmup=1),
        _matrix(
            "paper",
            32,
            3,
            32,
            repeats=3,
            warmup=1,
            checkpoint=True,
            name="matrix_paper_32_it3_b32_train_checkpoint",
        ),
        _matrix("paper", 32, 3, 32, kind="infer", repeats=3, warmup=1),
    ]


def gpu_cases() -> list[dict]:
    """``run.py --device cuda`` (``benchmarks/gpu.sh``): GPU-sized training steps and routing.

    Targets (RESULTS.md, "GPU"): matrix capsnet small >= 5,000 and paper size >= 1,000
    training images/s at batch 64; CapsNet >= 3x the reference on the same GPU.
    """
    return [
        _case("em_convcaps1_paper", kind="routing", routing="conv_em", iterations=3,
              repeats=10, warmup=3, **CONVCAPS1_PAPER),
        _sabour(128, repeats=20, warmup=3),
        _sabour(128, amp="bf16", name="capsnet_mnist_b128_train_bf16", repeats=20, warmup=3),
        _matrix("small", 28, 3, 64, repeats=20, warmup=3),
        _matrix("paper", 32, 3, 64, repeats=10, warmup=3),
        _matrix("small", 28, 3, 256, kind="infer", repeats=20, warmup=3),
    ]  # fmt: skip


def contention_cases() -> list[dict]:
    """``run.py --contention``: the training steps of issue 15's "busy machine" (one
    CPU-bound competitor process). ``reference``: also time the reference under load (the
    paper-size reference takes about a minute per step here, so not for that one)."""
    return [
        {**_sabour(128, repeats=5), "name": "contention_capsnet_mnist_b128_train",
         "reference": True},
        {**_matrix("small", 28, 3, 32, repeats=7),
         "name": "contention_matrix_small_28_it3_b32_train", "reference": True},
        {**_matrix("paper", 32, 3, 32, repeats=3, warmup=1),
         "name": "contention_matrix_paper_32_it3_b32_train", "reference": False},
    ]  # fmt: skip


def compile_cases() -> list[dict]:
    """``torch.compile`` variants (slow to compile on 2 cores; ``run.py --compile``)."""
    return [
        _case(
            "dynamic_routing_128x1152x10x16_compile",
            kind="routing",
            routing="dynamic",
            shape=[128, 1152, 10, 16],
            iterations=3,
            compile=True,
            repeats=5,
        ),
        _case(
            "em_classcaps_paper_compile",
            kind="routing",
            routing="em",
            iterations=3,
            compile=True,
            repeats=5,
            **CLASSCAPS_PAPER,
        ),
        _sabour(128, compile=True, name="capsnet_mnist_b128_train_compile", repeats=5),
        _matrix(
            "small",
            28,
            3,
            32,
            compile=True,
            name="matrix_small_28_it3_b32_train_compile",
            repeats=5,
        ),
    ]


def smoke_cases() -> list[dict]:
    """Tiny versions of every kind of case, for CI: seconds, not minutes."""
    tiny_matrix = {"A": 8, "B": 4, "C": 4, "D": 4, "variant": "paper"}  # reference.py: paper EM
    cases = [
        _case(
            "smoke_dynamic", kind="routing", routing="dynamic", shape=[2, 12, 3, 4], iterations=3
        ),
        _case(
            "smoke_dynamic_bf16",
            kind="routing",
            routing="dynamic",
            shape=[2, 12, 3, 4],
            iterations=3,
            amp="bf16",
        ),
        _case("smoke_em", kind="routing", routing="em", shape=[2, 8, 3, 16], iterations=3),
        _case(
            "smoke_conv_em",
            kind="routing",
            routing="conv_em",
            shape=[2, 4, 18, 3, 16],
            in_size=[4, 4],
            kernel_size=3,
            stride=1,
            iterations=2,
        ),
        _case(
            "smoke_capsnet",
            kind="train",
            model="capsnet",
            batch=2,
            input_size=28,
            model_kwargs={"iterations": 2, "conv_channels": 16, "primary_types": 4},
        ),
        _case(
            "smoke_capsnet_infer",
            kind="infer",
            model="capsnet",
            batch=2,
            input_size=28,
            model_kwargs={"iterations": 2, "conv_channels": 16, "primary_types": 4},
        ),
        _case(
            "smoke_matrix",
            kind="train",
            model="matrix_capsnet",
            batch=2,
            input_size=28,
            model_kwargs={"iterations": 2, **tiny_matrix},
        ),
        _case(
            "smoke_matrix_bf16",
            kind="train",
            model="matrix_capsnet",
            batch=2,
            input_size=28,
            amp="bf16",
            model_kwargs={"iterations": 2, **tiny_matrix},
        ),
        _case(
            "smoke_matrix_checkpoint",
            kind="train",
            model="matrix_capsnet",
            batch=2,
            input_size=28,
            checkpoint=True,
            model_kwargs={"iterations": 2, **tiny_matrix},
        ),
        _case(
            "smoke_matrix_infer",
            kind="infer",
            model="matrix_capsnet",
            batch=2,
            input_size=28,
            model_kwargs={"iterations": 2, **tiny_matrix},
        ),
    ]
    for c in cases:
        c.update(repeats=1, warmup=1)
    return cases


def smoke_contention_cases() -> list[dict]:
    """Tiny contention cases (``run.py --contention --smoke``): seconds, not minutes."""
    tiny = smoke_cases()
    by_name = {c["name"]: c for c in tiny}
    return [
        {**by_name["smoke_capsnet"], "name": "smoke_contention_capsnet", "reference": True,
         "repeats": 2},
        {**by_name["smoke_matrix"], "name": "smoke_contention_matrix", "reference": False,
         "repeats": 2},
    ]  # fmt: skip


# --------------------------------------------------------------------------- building


def case_device(case: dict) -> torch.device:
    """The device a case runs on (``case["device"]``, default the CPU)."""
    return torch.device(case.get("device", "cpu"))


def with_device(cases: list[dict], device: str) -> list[dict]:
    """The cases, each set to run on ``device``."""
    return [{**c, "device": device} for c in cases]


def amp_context(case: dict):
    if case["amp"] == "bf16":
        return torch.autocast(case_device(case).type, dtype=torch.bfloat16)
    if case["amp"] != "fp32":
        raise ValueError(f"amp must be 'fp32' or 'bf16', got {case['amp']!r}")
    return contextlib.nullcontext()


def supports_checkpoint() -> bool:
    """Whether capsnet's matrix capsule layers take ``checkpoint=`` (memory-saving option)."""
    import inspect

    from capsnet.layers import ConvMatrixCapsules

    return "checkpoint" in inspect.signature(ConvMatrixCapsules).parameters


def build_model(case: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(case["model_kwargs"])
    if case.get("checkpoint"):
        if not supports_checkpoint():
            raise NotImplementedError("capsnet's layers have no checkpoint option")
        kwargs["checkpoint"] = True
    return create(case["model"], **kwargs).to(case_device(case))


def model_inputs(case: dict, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels, drawn on the CPU (the same on every device), then moved."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(case["batch"], model.in_channels, *model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (case["batch"],), generator=g)
    device = case_device(case)
    return x.to(device), y.to(device)


def _loss(case: dict, scores, recon, x, y):
    if model_info(case["model"]).loss == "margin":
        loss = CF.margin_loss(scores.float(), y)
        if recon is not None:
            loss = loss + 0.0005 * CF.reconstruction_loss(recon.float(), x)
        return loss
    return CF.spread_loss(scores.float(), y, margin=0.2)


def build_step(case: dict, impl: str) -> tuple[Callable[[], object], Callable[[], tuple]]:
    """``(step, outputs)``: one timed step of ``impl``, and a function giving comparable outputs.

    ``outputs()`` runs a forward pass (no grad) and returns tensors to compare across impls.
    """
    if case["kind"] == "routing":
        return _routing_step(case, impl)
    model = build_model(case)
    net = reference.from_model(model) if impl == "reference" else model
    x, y = model_inputs(case, model)

    def run(m, xx, yy):
        out = m(xx, yy)
        return (out.scores, out.poses, out.reconstructions) if impl == "capsnet" else out

    fwd = run
    if case["compile"] and impl == "capsnet":
        fwd = torch.compile(run)

    def outputs():
        with torch.no_grad():
            return tuple(o for o in run(net, x, y if case["model"] == "capsnet" else None)[:2])

    if case["kind"] == "infer":
        net.eval()

        def step():
            with torch.inference_mode(), amp_context(case):
                return fwd(net, x, None)

        return step, outputs
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(case):
            scores, _, recon = fwd(net, x, y)
            loss = _loss(case, scores, recon, x, y)
        loss.backward()
        opt.step()
        return loss

    return step, outputs


def _routing_inputs(case: dict):
    g = torch.Generator().manual_seed(2)
    shape = case["shape"]
    device = case_device(case)
    if case["routing"] == "dynamic":
        return ((torch.randn(*shape, generator=g) * 0.1).to(device),)
    votes = torch.randn(*shape, generator=g)
    acts = torch.rand(*shape[:-2], generator=g)
    out_caps = shape[-2]
    beta_u = torch.randn(out_caps, generator=g) * 0.1
    beta_a = torch.randn(out_caps, generator=g) * 0.1
    return tuple(t.to(device) for t in (votes, acts, beta_u, beta_a))


def _routing_step(case: dict, impl: str):
    inputs = [t.requires_grad_() for t in _routing_inputs(case)]
    r = case["iterations"]
    lambdas = CF.default_inverse_temperatures(r)
    kind = case["routing"]
    if impl == "capsnet":
        if kind == "dynamic":

            def fn(u):
                return CF.dynamic_routing(u, r)
        elif kind == "em":

            def fn(v, a, bu, ba):
                return CF.em_routing(v, a, bu, ba, r)
        else:

            def fn(v, a, bu, ba):
                return CF.conv_em_routing(
                    v,
                    a,
                    bu,
                    ba,
                    in_size=tuple(case["in_size"]),
                    kernel_size=case["kernel_size"],
                    stride=case["stride"],
                    iterations=r,
                )

        if case["compile"]:
            fn = torch.compile(fn)
    else:
        if kind == "dynamic":

            def fn(u):
                return reference.dynamic_routing(u, r)
        elif kind == "em":

            def fn(v, a, bu, ba):
                return reference.em_routing(v, a, bu, ba, lambdas)
        else:

            def fn(v, a, bu, ba):
                return reference.conv_em_routing(
                    v,
                    a,
                    bu,
                    ba,
                    lambdas,
                    tuple(case["in_size"]),
                    case["kernel_size"],
                    case["stride"],
                )

    def step():
        for t in inputs:
            t.grad = None
        with amp_context(case):
            out = fn(*inputs)
            total = sum(o.float().sum() for o in out[:2])
        total.backward()
        return total

    def outputs():
        with torch.no_grad():
            return tuple(fn(*inputs)[:2])

    return step, outputs


# --------------------------------------------------------------------------- FLOPs


def _conv_flops(batch, c_in, c_out, k, h_out, w_out) -> float:
    return 2.0 * batch * c_out * h_out * w_out * c_in * k * k


def capsnet_flops(case: dict) -> dict[str, float] | None:
    """Matmul/convolution FLOPs of a Sabour CapsNet step (routing's few % not counted).

    Training counts forward + input-gradient + weight-gradient products (Conv1 has no
    input gradient). Returns ``{"total": ..., "conv": ...}`` or None for other models.
    """
    if case.get("model") != "capsnet":
        return None
    model = build_model(case)
    b = case["batch"]
    c1, prim = model.conv1, model.primary.conv
    h, w = model.input_size
    h1, w1 = h - c1.kernel_size[0] + 1, w - c1.kernel_size[1] + 1
    h2, w2 = (h1 - prim.kernel_size[0]) // 2 + 1, (w1 - prim.kernel_size[1]) // 2 + 1
    conv1 = _conv_flops(b, c1.in_channels, c1.out_channels, c1.kernel_size[0], h1, w1)
    primary = _conv_flops(b, prim.in_channels, prim.out_channels, prim.kernel_size[0], h2, w2)
    d = model.digits
    votes = 2.0 * b * d.in_caps * d.out_caps * d.out_dim * d.in_dim
    decoder = 0.0
    if model.decoder is not None:
        decoder = sum(
            2.0 * b * m.in_features * m.out_features
            for m in model.decoder.modules()
            if isinstance(m, torch.nn.Linear)
        )
    if case["kind"] == "train":
        conv = 2 * conv1 + 3 * primary
        return {"total": conv + 3 * votes + 3 * decoder, "conv": conv}
    return {"total": conv1 + primary + votes + decoder, "conv": conv1 + primary}


def matmul_gflops_reference(n: int = 4096, device: str = "cpu") -> Callable[[], object]:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return lambda: torch.mm(a, b)


MATMUL_N = 4096
MATMUL_FLOPS = 2.0 * MATMUL_N**3
