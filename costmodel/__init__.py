"""How long a batch takes and how much KV it holds: model architectures from Hugging Face configs, sourced
hardware specifications, a roofline prior, INFERMAX's linear batch-time model with its offline fit and online
calibration, KV-cache capacity, and cost-profile files."""

from vllm_shadow.costmodel.architecture import ModelArchitecture, available_models, load_model
from vllm_shadow.costmodel.hardware import HARDWARE, Hardware, get_hardware
from vllm_shadow.costmodel.kv import kv_capacity_blocks
from vllm_shadow.costmodel.linear import (
    BatchFeatures,
    LinearCostModel,
    OnlineCalibrator,
    batch_features,
    cross_validated_mape,
    fit_linear,
)
from vllm_shadow.costmodel.profile import CostProfile, fit_profile, load_profile, save_profile
from vllm_shadow.costmodel.roofline import (
    RooflineAssumptions,
    StepTime,
    roofline_batch_time,
    roofline_prior,
    roofline_step,
)

__all__ = [
    "HARDWARE",
    "BatchFeatures",
    "CostProfile",
    "Hardware",
    "LinearCostModel",
    "ModelArchitecture",
    "OnlineCalibrator",
    "RooflineAssumptions",
    "StepTime",
    "available_models",
    "batch_features",
    "cross_validated_mape",
    "fit_linear",
    "fit_profile",
    "get_hardware",
    "kv_capacity_blocks",
    "load_model",
    "load_profile",
    "roofline_batch_time",
    "roofline_prior",
    "roofline_step",
    "save_profile",
]
