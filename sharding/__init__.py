"""Device mesh, logical-axis rules, and multi-host start-up."""

from sharding.mesh import AXES, MeshConfig, ShardingError, make_mesh
from sharding.rules import (DEFAULT_RULES, PURE_DATA_PARALLEL, batch_sharding, check_batch, constrain,
                            param_shardings, spec_for, use_rules)

__all__ = ["AXES", "DEFAULT_RULES", "PURE_DATA_PARALLEL", "MeshConfig", "ShardingError", "batch_sharding",
           "check_batch", "constrain", "make_mesh", "param_shardings", "spec_for", "use_rules"]
