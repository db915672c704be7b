"""Data: the synthetic REFER-layout generator, REFER readers, and the Parquet index every stage reads.

Real RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF and the synthetic set share one on-disk layout (REFER's
``refs(<split_by>).p`` + ``instances.json`` + a folder of images), so everything after the ``index``
stage is the same code path for both.
"""
