"""A node that lies, for tests of spot checks and routing (swarm.spot_check, swarm.routing).

It is `swarm-node join` with a servicer that corrupts the hidden states it returns, or announces a
decode throughput it does not have::

    python -m devtools.lying_node --corrupt-outputs 0.05 [--when compressed_reply] \\
        [--announce-throughput 1e6] join --blocks 0:6 ...

The lie options come first; everything from `join` on is the usual `swarm-node` command line. Tests and
benchmarks start such a node with `devtools.launcher.start_node(..., lies=Lies(...))` (or
`LocalSwarm.add_node(..., lies=...)`). The shipped node has no trace of this: the lies live in a subclass
of `node.service.BlockServicer` that this module puts in the daemon's place before the node starts.

- `--corrupt-outputs S`: add gaussian noise of relative scale S (S times each position's RMS) to the
  hidden states it returns, from sessions and Forward alike;
- `--when compressed_reply` (with --corrupt-outputs): only to replies asked for in a codec (a reply
  codec other than "" or "none"), the steps that looked unchecked when checked steps asked for raw
  replies;
- `--announce-throughput X`: announce X blocks/s instead of its measured decode throughput;
- `--push refuse`: in forwarded sessions, report every push to the next hop as failed without pushing;
  `--push drop`: report every push as under way without pushing; `--push corrupt`: push corrupted hidden states (noise of --corrupt-outputs' scale, 0.05 if not given)
  while replying the true ones to the client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from edgeswarm.node.service import BlockServicer

WHEN = ("always", "compressed_reply")
PUSH = ("honest", "refuse", "drop", "corrupt")
PUSHED_NOISE = 0.05  # relative noise of corrupted pushes when --corrupt-outputs does not say


@dataclass(frozen=True)
class Lies:
    """How a lying node lies; the default lies in no way."""

    corrupt_outputs: float = 0.0  # relative scale of the noise added to returned hidden states (0: none)
    when: str = "always"  # or "compressed_reply": corrupt only replies asked for in a codec
    announce_throughput: float | None = None  # blocks/s to announce instead of the measured throughput
    push: str = "honest"  # or "refuse" / "drop" / "corrupt": how it pushes outputs to the next hop

    def __post_init__(self) -> None:
        if self.when not in WHEN:
            raise ValueError(f"when must be always or compressed_reply, got {self.when!r}")
        if self.push not in PUSH:
            raise ValueError(f"push must be one of {PUSH}, got {self.push!r}")
        if not self.corrupt_outputs >= 0:
            raise ValueError(f"corrupt_outputs must be at least 0, got {self.corrupt_outputs}")
        if self.announce_throughput is not None and not self.announce_throughput > 0:
            raise ValueError(f"announce_throughput must be positive, got {self.announce_throughput}")

    def corrupts(self, reply_codec: str) -> bool:
        """Whether a reply in `reply_codec` is to be corrupted."""
        return self.corrupt_outputs > 0 and (self.when == "always" or reply_codec not in ("", "none"))

    def corrupt(self, output: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """`output` plus gaussian noise of `scale` (default `corrupt_outputs`) times each position's RMS
        (computed in float32)."""
        import torch

        states = output.float()
        noise = (self.corrupt_outputs if scale is None else scale) * states.pow(2).mean(-1, keepdim=True).sqrt() * torch.randn_like(states)
        return (states + noise).to(output.dtype)

    def to_args(self) -> list[str]:
        """The options of this module's command line that ask for these lies."""
        args = []
        if self.corrupt_outputs:
            args += ["--corrupt-outputs", repr(self.corrupt_outputs), "--when", self.when]
        if self.announce_throughput is not None:
            args += ["--announce-throughput", repr(self.announce_throughput)]
        if self.push != "honest":
            args += ["--push", self.push]
        return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.lying_node",
        description="swarm-node join, with a node that lies (for tests of spot checks and routing).",
        allow_abbrev=False,
    )
    parser.add_argument("--corrupt-outputs", type=float, default=0.0, metavar="SCALE", help="noise of this relative scale on returned hidden states")
    parser.add_argument("--when", choices=WHEN, default="always", help="compressed_reply: corrupt only replies asked for in a codec")
    parser.add_argument("--announce-throughput", type=float, default=None, metavar="BLOCKS_PER_SECOND", help="announce this instead of the measured throughput")
    parser.add_argument("--push", choices=PUSH, default="honest", help="refuse: report pushes as failed; drop: report them as sent, send none; corrupt: push corrupted states")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, metavar="join ...", help="the swarm-node command line")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Lies, list[str]]:
    """The lies asked for and the swarm-node command line after them (which must be a `join`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.node_args[:1] != ["join"]:
        parser.error("the lie options must be followed by `join` and its swarm-node arguments")
    try:
        lies = Lies(args.corrupt_outputs, args.when, args.announce_throughput, args.push)
    except ValueError as error:
        parser.error(str(error))
    return lies, args.node_args


def lying_servicer(base: type[BlockServicer], lies: Lies) -> type[BlockServicer]:
    """A subclass of `base` that lies as `lies` says."""

    class LyingServicer(base):  # type: ignore[valid-type, misc]
        @property
        def announced_throughput(self) -> float:
            return lies.announce_throughput or super().announced_throughput

        def _encode_reply(self, output, codec, boundary):  # every reply of Forward and sessions passes here
            if lies.corrupts(codec):
                output = lies.corrupt(output)
            return super()._encode_reply(output, codec, boundary)

        def _push(self, target, output):  # every push to a next hop passes here
            if lies.push == "refuse":
                return "refusing to push (a lying node)"
            if lies.push == "drop":
                return ""
            if lies.push == "corrupt":
                from edgeswarm.protocol.codecs import decode_tensor

                states = lies.corrupt(decode_tensor(output, bases=self.bases), lies.corrupt_outputs or PUSHED_NOISE)
                output = base._encode_reply(self, states, output.codec, target.start_block)
            return super()._push(target, output)

    return LyingServicer


def main(argv: Sequence[str] | None = None) -> int:
    lies, node_argv = parse_args(argv)
    from edgeswarm.node import cli  # first: it sets the node's environment before torch loads

    from edgeswarm.node import daemon

    daemon.BlockServicer = lying_servicer(daemon.BlockServicer, lies)  # the class SwarmNode.start builds
    if lies != Lies():
        print(f"lying node: {lies}", file=sys.stderr, flush=True)
    return cli.main(node_argv)


if __name__ == "__main__":
    sys.exit(main())
