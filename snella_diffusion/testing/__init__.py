"""What tests and benchmarks build on, kept out of the library's top level: tiny pipelines of
each family's real classes (``tiny_models``, ``tiny_dit_models``), published architectures with
random weights (``reference_configs``) and the training-step benchmark harness
(``benchmarking``). Nothing here downloads weights."""
