"""Edge export: a run's model as ONNX plus the preprocessing that feeds it.

:mod:`raylens.export.onnx_export` writes and verifies ``model.onnx``;
:mod:`raylens.export.preprocess` holds the ``preprocess.json`` spec and its NumPy + Pillow
reference implementation (no torch). Pure: no Ray.
"""
