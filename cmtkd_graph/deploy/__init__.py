"""After training: the student alone, evaluated, exported and run.

* ``student``: find a run's student and load it as a plain module (``load_student``).
* ``codes`` / ``packing``: the quantized layers as packed integer codes with their scales.
* ``integer``: the integer reference forward (integer codes, int64 accumulation, scales once).
* ``cost``: MACs, BOPs and sizes.
* ``onnx_export``: ONNX with QuantizeLinear/DequantizeLinear (optional extra ``[export]``).
* ``export``: the ``cmtkd-graph export`` command's work and its manifest.
"""

from cmtkd_graph.deploy.integer import integer_student
from cmtkd_graph.deploy.student import find_student, load_student

__all__ = ["find_student", "integer_student", "load_student"]
