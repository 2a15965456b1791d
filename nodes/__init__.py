"""The pack's node classes: thin wrappers that validate inputs and call into ``p3s_core``."""
from .adapter_nodes import P3SAdapterLoader, P3SAdapterSave
from .injector_nodes import P3SConditionInjector
from .points_nodes import P3SPointSelector
from .region_nodes import P3SRegion
from .rngr_nodes import P3SRNGRMaskInpaint
from .schedule_nodes import P3STimestepWeightScheduler
from .trainer_nodes import P3STrainer

NODE_CLASS_MAPPINGS = {
    "P3SPointSelector": P3SPointSelector,
    "P3SRNGRMaskInpaint": P3SRNGRMaskInpaint,
    "P3STimestepWeightScheduler": P3STimestepWeightScheduler,
    "P3SConditionInjector": P3SConditionInjector,
    "P3SAdapterLoader": P3SAdapterLoader,
    "P3SAdapterSave": P3SAdapterSave,
    "P3STrainer": P3STrainer,
    "P3SRegion": P3SRegion,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "P3SPointSelector": "P3S Point Selector",
    "P3SRNGRMaskInpaint": "P3S RNGR Mask + Inpaint",
    "P3STimestepWeightScheduler": "P3S Timestep Weight Scheduler",
    "P3SConditionInjector": "P3S Condition Injector",
    "P3SAdapterLoader": "P3S Adapter Loader",
    "P3SAdapterSave": "P3S Adapter Save",
    "P3STrainer": "P3S Trainer",
    "P3SRegion": "P3S Region",
}
