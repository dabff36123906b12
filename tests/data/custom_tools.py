"""A sample tools file, as passed to ``swarm-node join --tools FILE.py``."""

from pathlib import Path

from edgeswarm.agent.tools import tool


@tool
def word_count(text: str) -> int:
    """Count the words in a text.

    Args:
        text: The text whose whitespace-separated words are counted.
    """
    return len(text.split())


@tool(idempotent=False)
def append_note(path: str, note: str) -> str:
    """Append one line to a notes file, creating it if needed.

    Args:
        path: The notes file.
        note: The line to append.
    """
    with Path(path).open("a", encoding="utf-8") as notes:
        notes.write(note + "\n")
    return f"appended to {path}"


def not_a_tool(text: str) -> str:
    """Plain helpers are not collected."""
    return text
