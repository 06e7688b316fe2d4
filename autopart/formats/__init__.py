"""Saved data and its rules: the profile and plan formats, stage costs, devices, units, atomic writes.

May import: the standard library and ``autopart.errors`` only (no numpy, no torch).
"""
