"""The run: from checked options to CKA matrices and files.

``plan`` checks options and expands pairs, ``run`` does the forward passes and the
pairwise CKA, ``outputs`` writes heatmaps, matrices and the run record.
"""

from .outputs import RECORD_NAME, write_outputs
from .plan import CKA_TYPES, KernelSettings, ModelSpec, PairTask, RunOptions, RunPlan, UsageError, build_plan
from .run import PairResult, PreparedModel, RunResult, run_plan

__all__ = [
    "CKA_TYPES",
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
    "run_plan",
    "write_outputs",
]
