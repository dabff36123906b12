"""Tools for tests, benchmarks and the demo, outside the shipped `edgeswarm` package: starting node
processes on this machine (launcher), the network-namespace testbed (testbed), the single-process
reference model (reference), greedy decoding of a session (decoding) and the function-calling
evaluation harness (evaluation)."""
