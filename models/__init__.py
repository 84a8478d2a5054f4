"""Models to compare: building them, choosing their layers, and hooking those layers."""

from .checkpoints import CheckpointError, load_state_dict, load_weights
from .errors import ModelLoadError
from .hooks import KernelRecorder
from .layers import (
    TRACE_EXAMPLES,
    CallRecord,
    LayerInfo,
    LayerSelection,
    first_float_tensor,
    kernel_sizes_present,
    layers_of_modules,
    max_depth,
    module_depth,
    select_layers,
    trace_calls,
    union_of_layers,
)
from .layout import prefers_channels_last, set_channels_last, with_layout
from .zoo import (
    LIBRARIES,
    InputSpec,
    available_models,
    build_model,
    check_model_name,
    input_spec,
    weights_file,
)

__all__ = [
    "LIBRARIES",
    "TRACE_EXAMPLES",
    "CallRecord",
    "CheckpointError",
    "InputSpec",
    "KernelRecorder",
    "LayerInfo",
    "LayerSelection",
    "ModelLoadError",
    "available_models",
    "build_model",
    "check_model_name",
    "first_float_tensor",
    "input_spec",
    "kernel_sizes_present",
    "layers_of_modules",
    "load_state_dict",
    "load_weights",
    "max_depth",
    "module_depth",
    "prefers_channels_last",
    "select_layers",
    "set_channels_last",
    "trace_calls",
    "union_of_layers",
    "weights_file",
    "with_layout",
]
