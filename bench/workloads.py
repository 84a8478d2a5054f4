"""Workloads of ``bench/benchmark.py``: the models, layers, estimator and images of each.

Every tool of a workload (our engine, the bare forward passes and each peer package)
gets the same preprocessed images and torchvision models built with ``weights=None``
after ``torch.manual_seed(SEED)``. Layers are every leaf module that owns parameters
(depth -1), output layer included, or the modules at depth 2 plus shallower leaves.
HSIC is the unbiased estimator of Song et al. (2012), summed over batches as minibatch CKA.

This module imports nothing, so that every helper script can use it.
"""

import dataclasses
import itertools

SEED = 0
DATASET = "sample_photos"
RBF_SIGMA = 1.0

# Smaller versions of the workloads for checking that the harness works end to end.
# Their numbers do not measure speed.
QUICK_BATCH_SIZE = 16
QUICK_BATCH_SIZE_LARGE_INPUTS = 8
QUICK_BATCH_COUNT = 2


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark case.

    Attributes:
        key: short name used in flags and file names, such as ``"W1"``.
        title: a few words for the heading of its table.
        models: torchvision model names. Without ``compare_all`` there are two, the rows
            model and the columns model.
        compare_all: compare every pair of ``models``, each model with itself included, as
            the engine's ``--compare_all 1`` does; otherwise ``models[0]`` with ``models[1]``.
        depths: layer depths, -1 for the leaf layers.
        kernel: ``"linear"`` or ``"rbf"``.
        image_size: input side in pixels.
        batch_size: images per batch.
        batch_count: number of batches.
        reference: also compute the numpy float64 reference of ``bench/reference.py``.
    """

    key: str
    title: str
    models: tuple[str, ...]
    compare_all: bool
    depths: tuple[int, ...]
    kernel: str
    image_size: int
    batch_size: int
    batch_count: int
    reference: bool

    @property
    def image_count(self) -> int:
        return self.batch_size * self.batch_count

    @property
    def cka_type(self) -> str:
        """The engine's ``--CKA_type`` value for this workload's kernel."""
        return {"linear": "linear_CKA", "rbf": "kernel_CKA"}[self.kernel]

    def comparisons(self) -> list[tuple[str, str, int]]:
        """Return ``(rows model, columns model, depth)`` of every matrix, in the engine's order.

        With ``compare_all``, the engine orders pairs as ``a-a a-b a-c b-b b-c c-c`` and runs
        every depth of a pair before the next pair.
        """
        if self.compare_all:
            pairs = list(itertools.combinations_with_replacement(self.models, 2))
        else:
            pairs = [(self.models[0], self.models[1])]
        return [(model_x, model_y, depth) for model_x, model_y in pairs for depth in self.depths]

    def describe(self) -> str:
        """Return the settings as one line of Markdown."""
        kernel = "linear CKA" if self.kernel == "linear" else f"RBF kernel CKA (sigma {RBF_SIGMA:g})"
        if self.compare_all:
            models = f"every pair of {', '.join(self.models)} (each with itself included)"
        else:
            models = f"{self.models[0]} (rows) vs {self.models[1]} (columns)"
        depths = " and ".join(str(depth) for depth in self.depths)
        return (
            f"{models}; layer depth {depths}; {kernel}, unbiased HSIC; {self.image_count} "
            f"`{DATASET}` images of {self.image_size}x{self.image_size} in {self.batch_count} "
            f"batches of {self.batch_size}"
        )


FULL_WORKLOADS = (
    Workload(
        key="W1",
        title="pair",
        models=("resnet18", "resnet34"),
        compare_all=False,
        depths=(-1,),
        kernel="linear",
        image_size=64,
        batch_size=64,
        batch_count=8,
        reference=True,
    ),
    Workload(
        key="W2",
        title="zoo",
        models=("resnet18", "resnet34", "vgg11", "mobilenet_v2"),
        compare_all=True,
        depths=(-1, 2),
        kernel="linear",
        image_size=64,
        batch_size=64,
        batch_count=4,
        reference=False,
    ),
    Workload(
        key="W3",
        title="RBF kernel",
        models=("resnet18", "resnet34"),
        compare_all=False,
        depths=(-1,),
        kernel="rbf",
        image_size=64,
        batch_size=64,
        batch_count=8,
        reference=True,
    ),
    Workload(
        key="W4",
        title="large inputs",
        models=("resnet18", "resnet34"),
        compare_all=False,
        depths=(-1,),
        kernel="linear",
        image_size=224,
        batch_size=32,
        batch_count=4,
        reference=True,
    ),
)

# The memory check runs our engine alone on W1 with these batch counts.
MEMORY_CHECK_KEY = "M"
MEMORY_CHECK_BASE = "W1"
MEMORY_CHECK_BATCH_COUNTS = (2, 16)
QUICK_MEMORY_CHECK_BATCH_COUNTS = (2, 4)


def quick_version(workload: Workload) -> Workload:
    """Return the workload with fewer and smaller batches."""
    batch_size = QUICK_BATCH_SIZE if workload.image_size <= 64 else QUICK_BATCH_SIZE_LARGE_INPUTS
    return dataclasses.replace(workload, batch_size=batch_size, batch_count=QUICK_BATCH_COUNT)


def workloads(quick: bool) -> dict[str, Workload]:
    """Return the workloads by key, in the order they run."""
    chosen = [quick_version(workload) if quick else workload for workload in FULL_WORKLOADS]
    return {workload.key: workload for workload in chosen}


def memory_check_workloads(quick: bool) -> tuple[Workload, Workload]:
    """Return the base workload with the memory check's small and large batch counts."""
    base = workloads(quick)[MEMORY_CHECK_BASE]
    counts = QUICK_MEMORY_CHECK_BATCH_COUNTS if quick else MEMORY_CHECK_BATCH_COUNTS
    small, large = (
        dataclasses.replace(base, key=f"{MEMORY_CHECK_KEY}{count}", batch_count=count, reference=False)
        for count in counts
    )
    return small, large
