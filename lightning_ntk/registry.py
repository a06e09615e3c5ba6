"""The kernel registry: one vocabulary of kernel names that every stage reads.

A name says everything a stage needs to know: which family of features the kernel is made of
(per-class gradients for the trNTK, gradients of the summed logits for the pNTK, the full per-class
block for the eNTK, layer outputs for the em/ck baselines), whether those gradients are randomly
projected, and whether the kernel is cosine-normalised. Featurization, the kernels, the surrogate,
the pipeline, the callback and the study all look names up here, so that one name always means one
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

GRADIENT_FAMILIES = ("trntk", "pntk", "entk")


@dataclass(frozen=True)
class Kernel:
    """One registered kernel.

    ``family``: ``trntk`` (per-class gradients, summed over classes), ``pntk`` (gradient of the summed
    logits), ``entk`` (the full ``C×C`` block per pair), ``em`` (chosen layers' outputs) or ``ck`` (input
    of the last linear layer). ``projected``: gradients replaced by random projections of dimension K.
    ``normalized``: cosine-normalised by the diagonal self-kernels.
    """

    name: str
    family: str
    projected: bool
    normalized: bool
    description: str

    @property
    def from_gradients(self) -> bool:
        return self.family in GRADIENT_FAMILIES

    @property
    def summed(self) -> bool:
        """Whether the gradients are those of the summed logits (one output) rather than per class."""
        return self.family == "pntk"

    @property
    def scalar(self) -> bool:
        """Whether ``κ(x, x')`` is a number, as a kernel machine needs (the eNTK is a ``C×C`` block)."""
        return self.family != "entk"


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("proj_trntk", "trntk", True, True, "trNTK of randomly projected per-class gradients (K = projection dim)"),
        Kernel("proj_trntk0", "trntk", True, False, "unnormalised trNTK of randomly projected per-class gradients"),
        Kernel("proj_pntk", "pntk", True, True, "pNTK of the randomly projected gradient of the summed logits (C times cheaper)"),
        Kernel("trntk", "trntk", False, True, "exact trace NTK, cosine-normalised (small models)"),
        Kernel("trntk0", "trntk", False, False, "exact trace NTK, unnormalised (small models)"),
        Kernel("pntk", "pntk", False, True, "exact pseudo-NTK, cosine-normalised (small models)"),
        Kernel("entk", "entk", False, False, "exact empirical NTK, a C×C block per pair (exact_kernel only)"),
        Kernel("em", "em", False, True, "embedding kernel: chosen layers' outputs, cosine-normalised"),
        Kernel("ck", "ck", False, True, "conjugate kernel: input of the last linear layer, cosine-normalised"),
    )
}


def get_kernel(name: str | Kernel) -> Kernel:
    """The registered kernel called ``name`` (case-insensitive; ``-`` reads as ``_``)."""
    if isinstance(name, Kernel):
        return name
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in KERNELS:
        raise ValueError(f"Unknown kernel {name!r}; choose one of {', '.join(KERNELS)}.")
    return KERNELS[key]


def projected(name: str | Kernel) -> Kernel:
    """The projected kernel of the same family and normalisation (``trntk`` → ``proj_trntk``): what
    random-projection features of a gradient kernel estimate."""
    kernel = get_kernel(name)
    if kernel.projected:
        return kernel
    match = [k for k in KERNELS.values() if k.projected and k.family == kernel.family and k.normalized == kernel.normalized]
    if not match:
        raise ValueError(f"The kernel {kernel.name!r} has no random projection; projected kernels: {names(projected=True)}.")
    return match[0]


def names(**properties: bool) -> list[str]:
    """Names of the registered kernels with the given properties, e.g. ``names(projected=True)``."""
    return [k.name for k in KERNELS.values() if all(getattr(k, p) == v for p, v in properties.items())]
