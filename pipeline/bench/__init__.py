"""The benchmarks (`python -m pipeline.bench`, `make bench`): the comparison with ART (art), the study of methods
(study), the precision table and check (precision), on what they share (setup)."""
