"""The model store: model folders deployed at run time through NATS JetStream (records.py,
archive.py, the store client, and the worker's reconciler)."""
