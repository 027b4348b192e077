"""sirocco: Mistral and Mixtral in plain PyTorch.

The data path: tokens -> ``plan.BatchPlan`` (positions, cache slots, masks) -> ``model.Transformer`` with
``cache.RollingCache`` (computed by a backend: ``backends.attach``) -> logits -> ``generate.sampling``.
``generate.engine.Engine`` drives it for many prompts at once; ``cli`` holds the verbs.
"""

__version__ = "0.1.0"
