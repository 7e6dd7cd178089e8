from fastalign.integrations.hf import HeadInputs, head_inputs, lm_head_config, trunk_and_head
from fastalign.integrations.probe import ProbeResult, check_fused_head

__all__ = ["HeadInputs", "head_inputs", "lm_head_config", "trunk_and_head", "ProbeResult", "check_fused_head"]
