"""Deciding which node serves which blocks: profiling, span choice, planners and rebalancing."""
