#!/usr/bin/env python3
"""Run one public CKA package (a "peer") on two torchvision models and save its CKA matrix.

Peers, with the PyPI versions whose installed source the adapters were written against:
torch-cka 0.21, pytorch-cka 1.1.3 and ckatorch 1.0.3. Each adapter's docstring names the
estimator it computes and when its hooks read the layer outputs.

This script imports nothing from the repository. pytorch-cka installs a top-level package
named ``cka``, which is also the name of the repository's package. Run the script by its
path, not with ``python -m`` from the repository root, and without PYTHONPATH pointing at
the root, so that ``import cka`` finds pytorch-cka. For example:

    /work/bench-venv/bin/python bench/peers.py --peer pytorch-cka \\
        --models resnet18 resnet34 --layers layers.json --images images.npy \\
        --batch_size 64 --kernel linear --out pytorch-cka.npz

The output .npz contains ``cka`` (rows are the first model's layers, columns the second's),
``cka_seconds``, ``peak_rss_kib``, ``rss_kib_before_cka`` (the RSS right before the timed
part) and the run's settings. Exit status 3 means that the peer does not implement the
requested kernel.
"""

import argparse
import functools
import importlib
import importlib.metadata
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EXIT_UNSUPPORTED_KERNEL = 3

# An adapter takes (model_x, model_y, layers_x, layers_y, loader, kernel) and returns the
# CKA matrix as float64, rows in the order of layers_x and columns in the order of layers_y.
Adapter = Callable[[nn.Module, nn.Module, list[str], list[str], DataLoader, str], np.ndarray]


@dataclass(frozen=True)
class Peer:
    """A CKA package and how this script runs it."""

    distribution: str
    kernels: tuple[str, ...]
    estimator: str
    run: Adapter


def reorder_matrix(
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    layers_x: Sequence[str],
    layers_y: Sequence[str],
) -> np.ndarray:
    """Permute a matrix labelled by ``rows`` and ``columns`` into the order of the layer lists."""
    if sorted(rows) != sorted(layers_x) or sorted(columns) != sorted(layers_y):
        raise RuntimeError(
            f"the peer returned layers {list(rows)} x {list(columns)}, "
            f"expected {list(layers_x)} x {list(layers_y)}"
        )
    row_index = [list(rows).index(name) for name in layers_x]
    column_index = [list(columns).index(name) for name in layers_y]
    return matrix[np.ix_(row_index, column_index)]


def run_torch_cka(model_x, model_y, layers_x, layers_y, loader, kernel) -> np.ndarray:
    """Run torch-cka: minibatch CKA, linear kernel, unbiased HSIC.

    ``CKA.compare`` averages each layer pair's HSIC values over every batch, in float32, and
    then takes the ratio. Its hooks store the output tensor itself and read it after both
    forward passes, so an in-place op later in the forward (the ReLU after a BatchNorm, the
    residual ``+=``) changes what is recorded. ``compare`` leaves autograd enabled, and so
    does this adapter, so the time and memory include the autograd graph.
    """
    from torch_cka import CKA

    model_cka = CKA(
        model_x,
        model_y,
        model1_name="model_x",
        model2_name="model_y",
        model1_layers=layers_x,
        model2_layers=layers_y,
        device="cpu",
    )
    model_cka.compare(loader, loader)

    # Rows and columns follow the order in which the hooks first fired, which the feature
    # dicts of the last batch keep. export() labels them in named_modules() order instead,
    # which is wrong when forward() calls modules in another order than __init__ defines.
    matrix = model_cka.export()["CKA"].double().numpy()
    rows = list(model_cka.model1_features)
    columns = list(model_cka.model2_features)
    return reorder_matrix(matrix, rows, columns, layers_x, layers_y)


def import_pytorch_cka():
    """Import pytorch-cka's ``cka`` package and check that it is not the repository's."""
    distribution = importlib.metadata.distribution("pytorch-cka")
    expected_path = Path(distribution.locate_file("cka/__init__.py")).resolve()
    module = importlib.import_module("cka")
    if Path(module.__file__).resolve() != expected_path:
        sys.exit(
            f"error: 'import cka' loaded {module.__file__}, expected pytorch-cka's "
            f"{expected_path}. Remove the repository root from PYTHONPATH and run this "
            "script by its path."
        )
    return module


def run_pytorch_cka(model_x, model_y, layers_x, layers_y, loader, kernel) -> np.ndarray:
    """Run pytorch-cka: minibatch CKA, linear kernel, unbiased HSIC.

    ``compute_cka`` sums each layer pair's HSIC values over every batch, in float32, and
    clamps the ratio to [0, 1]. Its hooks keep ``output.detach().flatten(1)``, a view of
    the output, and read it after both forward passes, so in-place ops later in the forward
    change what is recorded. It raises ValueError on a batch of 3 images or fewer.
    """
    pytorch_cka = import_pytorch_cka()
    [matrix] = pytorch_cka.compute_cka(
        model_x,
        model_y,
        loader,
        layers=layers_x,
        model2_layers=layers_y,
        device="cpu",
        progress=False,
    )
    return matrix.double().numpy()


class OutputRecorder:
    """Forward hooks that copy named modules' outputs, flattened to (batch, features).

    The copy is taken when the hook fires, so in-place ops later in the forward pass do
    not change it.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        for name in names:
            modules[name].register_forward_hook(functools.partial(self._store, name))

    def _store(self, name: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.outputs[name] = output.detach().flatten(1).clone()


# ckatorch's model-level API, ckatorch.CKA, cannot run on CNNs. Its loop passes the raw
# layer output to cka_batch, which calls torch.bmm on it, and that fails on 4-D conv
# outputs ("batch1 must be a 3D tensor") and on 2-D linear outputs. For 3-D outputs it
# would treat the second axis (tokens) as the examples. The loop also assigns each
# batch's CKA instead of adding it, so only the last batch counts. The two ckatorch
# adapters therefore hook the layers with OutputRecorder and call ckatorch's functions.


def run_ckatorch(model_x, model_y, layers_x, layers_y, loader, kernel) -> np.ndarray:
    """Run ckatorch's minibatch CKA: linear kernel, unbiased HSIC (``hsic1``), float64.

    Each batch's Gram matrices come from ``ckatorch.linear_kernel``. ``ckatorch.hsic1``
    values are summed over every batch and combined as ``ckatorch.cka_batch`` combines
    them, ``sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L))``. Raises ValueError on
    a batch of 3 images or fewer, where hsic1 would divide by ``n (n - 3) = 0``.
    """
    import ckatorch

    recorder_x = OutputRecorder(model_x, layers_x)
    recorder_y = OutputRecorder(model_y, layers_y)
    model_x.eval()
    model_y.eval()

    hsic_xy = torch.zeros(len(layers_x), len(layers_y), dtype=torch.float64)
    hsic_xx = torch.zeros(len(layers_x), dtype=torch.float64)
    hsic_yy = torch.zeros(len(layers_y), dtype=torch.float64)
    with torch.no_grad():
        for (images,) in loader:
            if len(images) < 4:
                raise ValueError(
                    f"unbiased HSIC needs at least 4 images per batch, got a batch of {len(images)}"
                )
            model_x(images)
            model_y(images)

            # hsic1 takes stacks of Gram matrices of shape (stack, n, n).
            grams_x = torch.stack(
                [ckatorch.linear_kernel(recorder_x.outputs[name].double()) for name in layers_x]
            )
            grams_y = torch.stack(
                [ckatorch.linear_kernel(recorder_y.outputs[name].double()) for name in layers_y]
            )
            hsic_xx += ckatorch.hsic1(grams_x, grams_x)
            hsic_yy += ckatorch.hsic1(grams_y, grams_y)
            for row, gram_x in enumerate(grams_x):
                hsic_xy[row] += ckatorch.hsic1(gram_x.expand_as(grams_y), grams_y)

    return (hsic_xy / torch.sqrt(torch.outer(hsic_xx, hsic_yy))).numpy()


def run_ckatorch_full(model_x, model_y, layers_x, layers_y, loader, kernel) -> np.ndarray:
    """Run ckatorch's ``cka_base`` on all images at once: linear or RBF kernel, biased HSIC.

    The forward passes run in batches, but the CKA is computed once, in float64, on the
    concatenated outputs of every image. The HSIC is biased because ``unbiased=False`` is
    cka_base's default. The RBF bandwidth is ``sigma^2 = median(d_ij^2)`` over all pairs
    of images, the zero diagonal included.
    """
    import ckatorch

    recorder_x = OutputRecorder(model_x, layers_x)
    recorder_y = OutputRecorder(model_y, layers_y)
    model_x.eval()
    model_y.eval()

    # NOTE: this keeps every layer's output for every image in memory, so its memory grows
    # with the number of images times the total feature size of the hooked layers.
    batches_x = {name: [] for name in layers_x}
    batches_y = {name: [] for name in layers_y}
    with torch.no_grad():
        for (images,) in loader:
            model_x(images)
            model_y(images)
            for name in layers_x:
                batches_x[name].append(recorder_x.outputs[name])
            for name in layers_y:
                batches_y[name].append(recorder_y.outputs[name])

        features_x = [torch.cat(batches_x.pop(name)) for name in layers_x]
        features_y = [torch.cat(batches_y.pop(name)) for name in layers_y]
        matrix = np.empty((len(layers_x), len(layers_y)))
        for row, x in enumerate(features_x):
            for column, y in enumerate(features_y):
                matrix[row, column] = ckatorch.cka_base(x, y, kernel=kernel).item()
    return matrix


PEERS = {
    "torch-cka": Peer(
        distribution="torch-cka",
        kernels=("linear",),
        estimator="minibatch CKA, unbiased HSIC, hooks read after forward",
        run=run_torch_cka,
    ),
    "pytorch-cka": Peer(
        distribution="pytorch-cka",
        kernels=("linear",),
        estimator="minibatch CKA, unbiased HSIC, hooks read after forward",
        run=run_pytorch_cka,
    ),
    "ckatorch": Peer(
        distribution="ckatorch",
        kernels=("linear",),
        estimator="minibatch CKA, unbiased HSIC (hsic1), outputs copied in hook",
        run=run_ckatorch,
    ),
    "ckatorch-full": Peer(
        distribution="ckatorch",
        kernels=("linear", "rbf"),
        estimator="full-batch CKA (cka_base), biased HSIC, outputs copied in hook",
        run=run_ckatorch_full,
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", required=True, choices=sorted(PEERS), help="CKA package to run")
    parser.add_argument(
        "--models", nargs=2, required=True, metavar=("MODEL_X", "MODEL_Y"),
        help="two torchvision model names, built with weights=None",
    )
    parser.add_argument(
        "--layers", required=True, type=Path,
        help="JSON file with two lists of qualified module names, one list per model",
    )
    parser.add_argument(
        "--images", required=True, type=Path,
        help=".npy file of preprocessed float32 images, shape (N, 3, S, S)",
    )
    parser.add_argument("--batch_size", required=True, type=int, help="images per batch")
    parser.add_argument("--kernel", required=True, choices=("linear", "rbf"), help="CKA kernel")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="torch.manual_seed value set before each model is built (default: 0)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .npz file")
    args = parser.parse_args(argv)

    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    args.layer_lists = load_layer_lists(parser, args.layers)
    args.image_array = load_images(parser, args.images)
    return args


def load_layer_lists(parser: argparse.ArgumentParser, path: Path) -> tuple[list[str], list[str]]:
    try:
        with path.open() as file:
            lists = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--layers {path}: failed to read JSON: {error}")
    if not (
        isinstance(lists, list)
        and len(lists) == 2
        and all(isinstance(names, list) and names for names in lists)
        and all(isinstance(name, str) for names in lists for name in names)
    ):
        parser.error(f"--layers {path}: expected a JSON array of two non-empty lists of strings")
    for names in lists:
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            parser.error(f"--layers {path}: duplicate layer names {duplicates}")
    return lists[0], lists[1]


def load_images(parser: argparse.ArgumentParser, path: Path) -> np.ndarray:
    try:
        images = np.load(path)
    except (OSError, ValueError) as error:
        parser.error(f"--images {path}: failed to read .npy: {error}")
    if images.dtype != np.float32 or images.ndim != 4 or images.shape[1] != 3:
        parser.error(
            f"--images {path}: expected float32 of shape (N, 3, S, S), "
            f"got {images.dtype} of shape {images.shape}"
        )
    return images


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None)


def check_layer_names(model_name: str, model: nn.Module, names: Sequence[str]) -> None:
    """Exit with status 2 when a name is not a module of the model."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        sys.stderr.write(
            f"error: {model_name} has no modules named {missing}. "
            "See model.named_modules() for the valid names.\n"
        )
        sys.exit(2)


def peak_rss_kib() -> int:
    """Return the process's peak resident set size, in KiB (Linux ru_maxrss unit)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Return the process's resident set size now, in KiB, from ``/proc/self/statm``."""
    with open("/proc/self/statm", encoding="ascii") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    peer = PEERS[args.peer]
    if args.kernel not in peer.kernels:
        print(
            f"{args.peer} does not implement the {args.kernel} kernel "
            f"(supported: {', '.join(peer.kernels)})",
            file=sys.stderr,
        )
        return EXIT_UNSUPPORTED_KERNEL

    name_x, name_y = args.models
    layers_x, layers_y = args.layer_lists
    model_x = build_model(name_x, args.seed)
    model_y = build_model(name_y, args.seed)
    check_layer_names(name_x, model_x, layers_x)
    check_layer_names(name_y, model_y, layers_y)

    dataset = TensorDataset(torch.from_numpy(args.image_array))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=False)

    rss_before = peak_rss_kib()
    current_rss_before = current_rss_kib()
    start = time.perf_counter()
    matrix = peer.run(model_x, model_y, layers_x, layers_y, loader, args.kernel)
    seconds = time.perf_counter() - start
    rss_after = peak_rss_kib()

    np.savez(
        args.out,
        cka=np.asarray(matrix, dtype=np.float64),
        cka_seconds=seconds,
        peak_rss_kib=rss_after,
        peak_rss_kib_before_cka=rss_before,
        rss_kib_before_cka=current_rss_before,
        peer=args.peer,
        peer_version=importlib.metadata.version(peer.distribution),
        estimator=peer.estimator,
        kernel=args.kernel,
        models=np.array(args.models),
        row_layers=np.array(layers_x),
        column_layers=np.array(layers_y),
        num_images=len(dataset),
        batch_size=args.batch_size,
        seed=args.seed,
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
    )
    print(
        f"{args.peer}: {matrix.shape[0]}x{matrix.shape[1]} CKA matrix in {seconds:.3f} s, "
        f"peak RSS {rss_after / 1024:.0f} MiB, saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
