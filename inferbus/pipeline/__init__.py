"""The NATS pipeline: the producer client, the worker, subjects and discovery."""
