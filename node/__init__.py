"""The node daemon: loads a span of transformer blocks, serves it over gRPC and announces it in the DHT."""
