"""Pure measurement functions for memsweep: arrays and numbers in, numbers out.

`memorization` turns per-sequence code lengths into memorized bits, `mia` scores membership
inference, `capacity` fits capacity, bits per parameter and the MIA scaling law over a sweep. Every
quantity is defined in SCIENCE.md; this package imports only numpy, scipy, scikit-learn and the
standard library, so the driver can aggregate a sweep without torch, Ray, Hydra or MLflow.
"""
