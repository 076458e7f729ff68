"""The cost model a new engine starts from, before its own step times have calibrated it."""

from __future__ import annotations

import logging

from vllm_shadow.adapters.events import EngineInfo
from vllm_shadow.costmodel.architecture import ModelArchitecture, load_model
from vllm_shadow.costmodel.hardware import get_hardware
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.costmodel.roofline import roofline_prior

logger = logging.getLogger(__name__)

FALLBACK_MODEL = "llama-3-8b"
# Last resort when no roofline applies (say, a model too large for the named hardware): 10 ms a step and
# 20 us a token, the order of a mid-size model on one GPU. Calibration replaces it within a few hundred steps.
GENERIC = LinearCostModel(a=10e-3, b=20e-6, c=0.1e-6)


def engine_prior(info: EngineInfo, hardware: str) -> tuple[LinearCostModel, str]:
    """A roofline prior for the engine's model (from the config.json it announced) on `hardware`, and a
    description of where it came from."""
    hw = get_hardware(hardware)
    tp = max(1, info.tensor_parallel_size)
    budget = max(1, info.scheduler.max_num_batched_tokens)
    try:
        arch = ModelArchitecture.from_hf_config(info.model_config, name=info.model)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("cannot read %s's model config (%s); prior from %s", info.model, exc, FALLBACK_MODEL)
        arch = load_model(FALLBACK_MODEL)
    try:
        return roofline_prior(arch, hw, tp, max_batched_tokens=budget), f"roofline: {arch.name} on {hw.name}"
    except ValueError as exc:
        logger.warning("no roofline prior for %s on %s (%s); generic prior", arch.name, hw.name, exc)
        return GENERIC, f"generic (no roofline for {arch.name} on {hw.name}: {exc})"
