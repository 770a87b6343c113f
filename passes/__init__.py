"""torch.fx graph passes: tracing, activation rewriting, quantization, surgery, taps, composition.

Installed as ``cmtkd_graph.passes``. Each pass is a function ``GraphModule -> GraphModule``.
"""
