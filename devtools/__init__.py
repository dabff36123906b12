"""Tools for tests, benchmarks and the demo, outside the shipped `edgeswarm` package: starting node
processes on this machine (launcher), the network-namespace testbed (testbed), the single-process
reference model (reference), greedy decoding of a session (decoding), a node that lies for tests of
spot checks and routing (lying_node) and the function-calling evaluation harness (evaluation)."""
