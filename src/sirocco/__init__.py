"""sirocco: Mistral and Mixtral in plain PyTorch.

The data path: tokens -> ``masks.BatchPlan`` (positions, cache slots, masks) -> ``model.Transformer`` with
``cache.RollingCache`` -> logits -> ``generate.sampling``. ``generate.engine.Engine`` drives it for many
prompts at once.
"""

__version__ = "0.1.0"
