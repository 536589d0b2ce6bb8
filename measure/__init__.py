"""Pure measurement functions for memsweep: arrays and numbers in, numbers (and figures) out.

`memorization` turns per-sequence code lengths into memorized bits, `mia` scores membership
inference, `capacity` fits capacity, bits per parameter and the MIA scaling law over a sweep, and
`figures` draws the report's figures from plain arrays. Every quantity is defined in docs/science.md. This
package imports only numpy, scipy, scikit-learn, matplotlib and the standard library, so a sweep can be
aggregated and reported without torch, Ray, Hydra or MLflow.
"""
