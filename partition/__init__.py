"""Deciding which node serves which blocks: profiling, span choice, and (later) planners and rebalancing."""
