"""DeepSeek-V3-style and Llama/Qwen decoders as pure functions of a parameter pytree."""

from model.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # XLA:CPU scratch kept between calls (off: R1JAX_HOST_MALLOC=off): model/host_memory.py

from model.budget import count_params, flops_per_token  # noqa: E402 (after the malloc settings)
from model.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from model.transformer import (abstract_params, forward, graphdef, grow_cache, init_cache, init_params,
                               router_biases, update_router_bias)

__all__ = ["ConfigError", "MLAConfig", "ModelConfig", "MoEConfig", "RopeConfig", "abstract_params",
           "count_params", "flops_per_token", "forward", "graphdef", "grow_cache", "init_cache", "init_params",
           "router_biases", "update_router_bias"]
