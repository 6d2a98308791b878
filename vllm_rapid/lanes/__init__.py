"""vLLM-free: lanes (a thread and a device stream each), the Adaptive Resource Manager and the partition backends.

The worker, the profiler and the GPU mechanism benchmark all use these; nothing here may import vLLM
(``tests/test_layout.py`` checks it).
"""
