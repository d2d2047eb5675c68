"""autopar public API: plan a PyTorch model for a cluster and emit the distributed module."""
from planner.api import auto_parallelize, make_plan
from planner.plan import Plan

__all__ = ["auto_parallelize", "make_plan", "Plan"]
