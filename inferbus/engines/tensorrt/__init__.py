"""TensorRT: plan builds, the plan cache, optimization profiles and (on GPU nodes) the engine.

The engine itself needs the ``tensorrt`` and ``cuda-python`` packages (extra ``[tensorrt]``)
and an NVIDIA GPU; everything else in this package is plain Python and tested everywhere.
"""
