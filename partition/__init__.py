"""Deciding which node serves which blocks: span choice, rebalancing, planners and the swarm-wide plan.
It imports nothing of the project but protocol: the speeds and sizes it plans with come from records."""
