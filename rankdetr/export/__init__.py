"""Deployment exports of trained detectors (ONNX: :mod:`rankdetr.export.onnx`).

Nothing here is imported by ``import rankdetr``: onnx, onnxruntime and onnxscript are an
optional extra (``pip install -e .[onnx]``), needed only when exporting or checking.
"""
