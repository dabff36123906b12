"""Finding the swarm, choosing routes through it, and the client that generates with it."""
