"""How patient a client session is with nodes, how it replaces them, and how often it checks them."""

from __future__ import annotations

from dataclasses import dataclass

from edgeswarm.protocol.constants import CONNECT_TIMEOUT, MAX_ATTEMPTS

# The fraction of steps spot-checked by default (besides the first, always checked): about 1% of decode
# speed with a 128-token prompt, against 7% for 0.05 and 33% for 0.1; a check recomputes the whole
# sequence, so with a 512-token prompt it costs 28% (`python -m scripts.bench_spot_check`; README, "Lying peers").
DEFAULT_SPOT_CHECK = 0.02


@dataclass(frozen=True)
class SessionPolicy:
    """How a session's steps travel, how patient it is with nodes, and how it replaces them.

    `forwarding`: each node pushes its output straight to the next hop (swarm.session), instead of the
    client relaying every hop's output.

    A step that takes longer than `min_step_deadline` seconds, or several times the node's measured step
    time, counts as a stall when another node could take over; otherwise the session waits up to
    `step_timeout`. When no node serves a failed hop's blocks, it waits up to `replacement_wait` for one.

    `spot_check`: the fraction of steps (besides the first, always checked when it is above 0) on which
    every hop's output is verified on another node serving the same blocks; 0 turns spot checks off.
    Outputs may differ by `spot_check_tolerance` (float32 nodes) or `spot_check_quantized_tolerance`
    (bf16/int8 nodes), relative to their norm, per position, plus the error bound of the reply's link
    codec; a node judged lying is banned for `spot_check_ban_seconds`. `spot_check_seed` fixes which steps
    and verifiers are chosen. See swarm.spot_check for what is compared and who is judged lying.
    """

    forwarding: bool = True
    connect_timeout: float = CONNECT_TIMEOUT
    step_timeout: float = 60.0
    min_step_deadline: float = 0.5
    replacement_wait: float = 30.0
    max_failover_attempts: int = MAX_ATTEMPTS
    spot_check: float = DEFAULT_SPOT_CHECK
    spot_check_tolerance: float = 1e-3
    spot_check_quantized_tolerance: float = 0.2
    spot_check_ban_seconds: float = 24 * 3600.0
    spot_check_seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"spot_check must be a fraction in [0, 1], got {self.spot_check}")
