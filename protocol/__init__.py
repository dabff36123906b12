"""Wire formats shared by nodes and clients: tensors and codecs, DHT records and their validation, identity,
signing and per-call credentials."""
