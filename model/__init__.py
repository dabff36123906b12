"""Reading a model and running spans of its blocks: the layer that nodes and clients share.

Model files (GGUF, safetensors) and their cache, the supported architectures, spans of transformer blocks
with their KV caches and batched attention, weight quantization, the semantic codec's calibration, and
measuring a span's speed and size. It imports nothing of the swarm, the agents or the node's server.
"""
