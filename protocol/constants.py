"""The numbers nodes and clients (or several layers of either) must agree on, each named once.

A number that only one module uses keeps its local name there; these are the shared ones.
"""

from __future__ import annotations

# --- steps ---------------------------------------------------------------------------------------

# Rows (sequences x tokens) of a decode step, at most. Such a step is bound by memory bandwidth, not
# compute, so it runs on one thread (node.batching) with the low-precision kernels (model.quantization),
# takes the link's decode budget (protocol.link_policy), and is timed apart from prefill chunks
# (swarm.session). 8 holds a one-token step of a small batch, while a prompt is longer; waking the
# OpenMP pool for such a step cost ~1 ms per 10 blocks (README, "Benchmark").
DECODE_STEP_TOKENS = 8

# Tokens per prefill chunk: a longer step is sent (swarm.session) and run (node.batching) this many
# tokens at a time, so that other sessions' decodes go on between the chunks of a long prompt. 256 tokens
# of SmolLM2-135M take about 0.6 s through all 30 blocks on a 2-core CPU, so a decode waits at most that
# long, while each chunk still amortises a hop's fixed cost over many tokens.
PREFILL_CHUNK_TOKENS = 256

# --- announcements -------------------------------------------------------------------------------

# Seconds a node's server record lives in the DHT unless renewed (`swarm-node join --announce-ttl`): a
# node that crashed drops out of routing within this long. 15 s: clients route around a dead node at
# once anyway (and ban it for longer), and a renewal every 5 s is one small DHT store per node.
ANNOUNCE_TTL = 15.0

# A DHT record is renewed this many times per lifetime (every TTL / 3 seconds), so it outlives one lost
# renewal (a DHT store that timed out) with a renewal period to spare.
REFRESHES_PER_TTL = 3

# --- calls to nodes ------------------------------------------------------------------------------

# Seconds to wait for a gRPC channel to a node to connect before the node counts as unreachable
# (sessions, agent steps, memory replication). 3 s: longer than a connect across a slow WAN link, short
# enough that a dead node costs little before the caller turns to another.
CONNECT_TIMEOUT = 3.0

# Seconds a StartRun or ResumeRun call may take: the node checks the run's tools and memory grants,
# writes or reads its journal and launches the run before it answers.
RUN_START_TIMEOUT = 30.0

# Seconds a short run-bookkeeping call (CancelRun, ReplicateRun) may take.
RUN_CONTROL_TIMEOUT = 10.0

# Times an operation on the swarm is tried (on another node, route or backup where there is one) before
# its failure is reported: one failure is usually a node leaving, three in a row mean the swarm cannot
# do it now.
MAX_ATTEMPTS = 3
