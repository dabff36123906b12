"""The main job: a 3-node swarm on loopback serving the embedded SmolLM2-135M-Instruct, answering a chat
prompt and then an agent task (its steps scheduled on the nodes, the calculator called as a tool)."""

from __future__ import annotations

import argparse
import time

from edgeswarm import SwarmClient
from edgeswarm.node.cli import describe_event
from devtools.launcher import LocalSwarm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--agent-goal", default="What is 1234 * 5678?")
    args = parser.parse_args()

    blocks_per_node = -(-30 // args.nodes)
    print(f"starting {args.nodes} nodes on loopback, {blocks_per_node} blocks each (each picks the least-covered span)")
    began = time.perf_counter()
    with LocalSwarm([["--num-blocks", str(blocks_per_node)]] * args.nodes) as swarm:
        for node in swarm.nodes:
            print(f"  node {node.info['node_id'][-8:]} at {node.address} serves blocks {node.blocks[0]}:{node.blocks[1]}")
        print(f"swarm ready in {time.perf_counter() - began:.1f}s; joining as a client through {swarm.initial_peers[0]}")
        with SwarmClient(swarm.initial_peers) as client:
            print(f"\nuser: {args.prompt}")
            began = time.perf_counter()
            result = client.chat([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_new_tokens)
            elapsed = time.perf_counter() - began
            print(f"assistant: {result.text.strip()}")
            print(f"\nroute: {' -> '.join(hop.describe() for hop in result.route)}")
            print(f"{len(result.token_ids)} tokens in {elapsed:.2f}s (finish: {result.finish_reason})")

            print(f"\nagent task: {args.agent_goal}")
            began = time.perf_counter()
            task = client.submit_agent_task(args.agent_goal, tools=["calculator"], tool_choice="required")
            for event in task.events():
                line = describe_event(event)
                if line is not None:
                    print(line)
            print(f"agent answer: {task.result()}  ({time.perf_counter() - began:.1f}s)")
        codes = swarm.stop()
    print(f"all nodes stopped (exit codes {codes})")


if __name__ == "__main__":
    main()
