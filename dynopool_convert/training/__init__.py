"""Fine-tuning of converted models: weights and DynOPool strides together under a FLOPs budget.

>>> from dynopool_convert.training import finetune          # doctest: +SKIP
>>> finetune("resnet18-dynopool.pt", "run", recipe="recipes/quick-cpu-demo.yaml")  # doctest: +SKIP
"""
from .data import AugmentConfig, DataSpec, build_datasets, parse_data_spec
from .recipes import ConvertPolicy, FinetuneConfig, TrainConfig, config_from_dict, load_recipe, merge_config
from .trainer import METRICS, FinetuneResult, TrainCallbacks, finetune, resolve_config

__all__ = [
    "finetune", "resolve_config", "FinetuneResult", "TrainCallbacks", "METRICS",
    "FinetuneConfig", "TrainConfig", "ConvertPolicy", "AugmentConfig", "config_from_dict", "load_recipe", "merge_config",
    "DataSpec", "parse_data_spec", "build_datasets",
]
