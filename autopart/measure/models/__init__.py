"""Built-in models, defined in code with random weights, never downloaded: names here, factories in
:mod:`autopart.measure.models.registry` (which imports torch; this module does not, so the command
line can list the names fast).
"""

__all__ = ["BUILTIN_NAMES"]

BUILTIN_NAMES = ("gpt2-tiny", "gpt2-mini", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "resnet-mini",
                 "mlp-hetero")
"""Every built-in model spec, in the order ``autopart profile --help`` lists them (a test checks it
against the registry)."""
