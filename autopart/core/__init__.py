"""The planner: cost model, partitioner, schedules, simulator, joint search, micro-batch scaling fits.

May import: numpy, scipy, ``autopart.formats`` and ``autopart.errors``; never torch.
"""
