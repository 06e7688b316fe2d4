"""From a model to a profile: model specs, cutting a module into blocks, the profiler, built-in models.

May import: torch (never torch.distributed), ``autopart.formats`` and ``autopart.errors``.
"""
