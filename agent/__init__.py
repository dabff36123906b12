"""The distributed agent runtime: agent runs as graphs of steps placed on swarm nodes."""
