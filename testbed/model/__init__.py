"""The model layer: read TFLite graphs, split them, build/fetch models, profile layers.

``tflite`` parses and writes flatbuffers (the only user of LiteRT's schema),
``graph`` describes layers and cut tensors, ``surgery`` extracts sub-models,
``splitter`` writes head/tail parts with a manifest, ``layers`` makes one-layer
models for per-layer profiling, ``zoo`` builds, fetches and registers models,
``profiler`` gathers KPIs through ``nodes.benchmark``. No TensorFlow.
"""
