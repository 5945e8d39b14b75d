"""A mutation harness: small, meaningful defects in the ops, the dispatch plan and the detector,
each applied to a copy of the repository, with the tests that must catch it.

``python -m tests.mutation`` (or ``make mutation``) runs every mutation and prints what caught
it; it is not part of ``make test`` (about 15 minutes). The list and its last result are in
``docs/debugging.md``.
"""
