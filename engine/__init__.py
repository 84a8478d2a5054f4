"""The run: from checked options to CKA matrices and files.

``plan`` checks options and expands pairs, ``run`` does the forward passes and the
pairwise CKA, ``outputs`` writes heatmaps, matrices and the run record. ``allocator``
sets glibc to keep freed memory, which the command line does for CPU runs.
"""

from .allocator import keep_freed_memory
from .api import Comparison, compare_models
from .outputs import RECORD_NAME, save_cka_matrix, write_outputs
from .plan import CKA_TYPES, KernelSettings, ModelSpec, PairTask, RunOptions, RunPlan, UsageError, build_plan
from .run import PairResult, PreparedModel, RunResult, run_plan

__all__ = [
    "CKA_TYPES",
    "Comparison",
    "RECORD_NAME",
    "KernelSettings",
    "ModelSpec",
    "PairResult",
    "PairTask",
    "PreparedModel",
    "RunOptions",
    "RunPlan",
    "RunResult",
    "UsageError",
    "build_plan",
    "compare_models",
    "keep_freed_memory",
    "run_plan",
    "save_cka_matrix",
    "write_outputs",
]
