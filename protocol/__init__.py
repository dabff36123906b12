"""Wire formats shared by nodes and clients: tensors, DHT records and their validation."""
