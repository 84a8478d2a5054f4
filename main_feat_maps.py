"""Compare the layers of image classifiers with CKA and draw one heatmap per pair of models.

Example (offline, random weights, bundled photographs):

    python main_feat_maps.py --models_names resnet18 resnet34 --torchvision 1 \
        --pretrained 0 --dataset sample_photos --layers_depth 2 --compare_all 1 \
        --batch_size 32 --dataloader_size 2
"""

import argparse
import logging
import signal
import sys
import threading

from data import DatasetError, default_data_root
from engine import RunOptions, UsageError, build_plan, keep_freed_memory, run_plan, write_outputs
from engine.cache import default_cache_dir
from engine.distributed import init_distributed, shutdown
from models import ModelLoadError

logger = logging.getLogger("main_feat_maps")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _interrupt(signal_number, frame):
    """Turn SIGTERM (from job schedulers and ``timeout``) into the cleanup path of Ctrl-C."""
    raise KeyboardInterrupt


class _ListModelsAction(argparse.Action):
    """Print the model names of every library and exit, like ``--version``."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from models import LIBRARIES, available_models

        for library in LIBRARIES:
            names = available_models(library)
            print(f"{library} ({len(names)}): {' '.join(names)}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every flag's help states its unit and default."""
    parser = argparse.ArgumentParser(
        description=(
            "Compute CKA similarity between every layer of one model and every layer of "
            "another, for each pair of models, and save heatmaps, matrices and a run record."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", type=str, default="CIFAR10",
        help="images to feed: a torchvision dataset class name (downloaded into --data_root "
             "when missing), a folder of images, or sample_photos (bundled, works offline)")
    add("--batch_size", type=int, default=5, help="images per batch")
    add("--dataloader_size", type=int, default=2,
        help="number of batches; the run uses batch_size x dataloader_size images")

    add("--torchvision", type=int, default=0,
        help="1: build models with torchvision; 0: with the pretrainedmodels package "
             "(same as --library torchvision or pretrainedmodels)")
    add("--library", type=str, default=None, choices=["pretrainedmodels", "torchvision", "timm"],
        help="model library; overrides --torchvision (default: the one --torchvision selects)")
    add("--weights", type=str, nargs="+", default=None,
        help="checkpoint files (.pt, .pth, .bin or .safetensors) for the --models_names models: "
             "one per model or one for all; 'none' keeps the library's weights")
    add("--compare_weights", type=str, nargs="+", default=None,
        help="checkpoint files for the --compare_models_names models, as --weights")
    add("--pretrained", type=int, nargs="+", default=[1],
        help="per pair: 1 loads ImageNet weights, 0 initialises randomly (seeded by --seed)")
    add("--compare_pretrained", type=int, nargs="+", default=None,
        help="per pair: --pretrained for the compare side; default: same as --pretrained")
    add("--device", type=int, default=0,
        help="-1: CPU; N: CUDA device N, or the CPU with a warning when CUDA is unavailable")

    add("--models_names", type=str, nargs="+", required=True,
        help="architectures to compare, such as resnet18 vgg16")
    add("--compare_models_names", type=str, nargs="+", default=None,
        help="the model each --models_names entry is compared with, by position; "
             "default: each model with itself")
    add("--output_path", type=str, default="./output",
        help="folder for every file the run writes; created if missing")
    add("--input_shape", type=int, nargs="+", default=[224],
        help="per pair: input side in pixels for torchvision models; pretrainedmodels "
             "models use the size of their settings")

    add("--CKA_type", type=str, nargs="+", default=["kernel_CKA"],
        choices=["kernel_CKA", "linear_CKA"], help="per pair: RBF-kernel CKA or linear CKA")
    add("--layers_depth", type=int, nargs="+", default=[-1],
        help="per pair: -1 for the deepest (leaf) layers, d >= 1 for the modules at depth d "
             "plus shallower leaves; with --compare_all 1 every pair runs at every depth given")
    add("--conv_only", type=int, default=0,
        help="1: compare only convolutions whose kernel sizes lie in --kernel_size")
    add("--remove_output_layer", type=int, default=1,
        help="1: drop each model's last executed layer (the classifier output)")
    add("--compare_all", type=int, default=0,
        help="1: compare every pair of --models_names entries and each entry with itself")
    add("--kernel_size", type=int, nargs="+", default=[3, 100],
        help="with --conv_only 1: one value for an exact kernel size, two for an inclusive range")
    add("--include_parameter_free", type=int, default=0,
        help="1: also compare modules without parameters, such as activations and pooling")

    add("--hsic", type=str, default="unbiased", choices=["unbiased", "biased"],
        help="HSIC estimator: unbiased (Song et al. 2012, needs batch_size >= 4) or biased")
    add("--rbf_sigma", type=float, default=1.0,
        help="kernel_CKA bandwidth, as a multiple of the median distance between examples")

    add("--seed", type=int, default=0,
        help="seed of the image subset, the sample_photos crops and random initialisation")
    add("--data_root", type=str, default=None,
        help=f"folder of torchvision datasets (default: {default_data_root()})")
    add("--download", type=int, default=1,
        help="1: download a missing torchvision dataset; 0: never use the network for it")
    add("--num_workers", type=int, default=0, help="processes that load and preprocess images")
    add("--cache", type=int, default=1,
        help="1: keep each model's per-batch kernels on disk and reuse them in later runs "
             "with the same model, weights, images and settings; 0: compute everything")
    add("--cache_dir", type=str, default=None,
        help=f"folder of the kernel cache (default: {default_cache_dir()}); delete it to clear")

    add("--no_progress", action="store_true", help="hide the progress bars")
    add("--log_level", type=str, default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    add("--list_models", action=_ListModelsAction,
        help="print the model names of every library and exit")
    return parser


def _options(arguments: argparse.Namespace) -> RunOptions:
    values = vars(arguments).copy()
    for name in ("no_progress", "log_level"):
        values.pop(name)
    return RunOptions(**values)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Under ``torchrun`` every rank runs this; rank 0 alone logs progress and writes files.
    """
    argv = sys.argv[1:] if argv is None else argv
    arguments = build_parser().parse_args(argv)
    import torch

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    context = init_distributed(use_cuda=arguments.device >= 0 and torch.cuda.is_available())
    logging.basicConfig(
        level=arguments.log_level if context.is_main else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            plan = build_plan(_options(arguments))
            logger.info(
                "%d heatmap(s) for %d model(s) on %s", len(plan.tasks), len(plan.models), plan.device
            )
            if plan.device == "cpu":
                keep_freed_memory()
            cache_dir = (plan.options.cache_dir or default_cache_dir()) if plan.options.cache else None
            result = run_plan(plan, progress=not arguments.no_progress, context=context, cache_dir=cache_dir)
            files = write_outputs(result, [sys.argv[0], *argv], cache_dir) if context.is_main else None
    except (UsageError, ModelLoadError, DatasetError) as error:
        if context.is_main:
            logger.error("%s", error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        resume = (
            "; finished batches stay in the kernel cache and the same command resumes from them"
            if arguments.cache
            else ""
        )
        logger.error("interrupted before any file was written%s", resume)
        return EXIT_INTERRUPTED
    except torch.cuda.OutOfMemoryError as error:
        logger.error(
            "the GPU ran out of memory (%s); lower --batch_size or --input_shape, or compare "
            "fewer models per command", str(error).splitlines()[0],
        )
        return EXIT_FAILURE
    finally:
        shutdown(context)

    if not context.is_main:
        return 0
    for pair in result.pairs:
        nan_note = f", {pair.nan_cells} undefined (NaN) cells" if pair.nan_cells else ""
        logger.info(
            "%s, %s: %dx%d%s -> %s.png",
            pair.title, pair.task.cka_type, *pair.matrix.shape, nan_note, pair.task.stem,
        )
    logger.info("wrote %d heatmap(s) and %s to %s", len(result.pairs), files["record"][0],
                plan.options.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
