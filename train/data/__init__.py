"""Data: sources, tokenizers, the token store, datasets, samplers and loaders."""

BUILTIN_PREFIX = "builtin:"
IGNORE_INDEX = -100  # a label that adds nothing to the loss (padding)


def load_hub_dataset(source: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)` for `data.source`, as a dict of splits with a
    'train' split; any failure (not found, offline, gated, corrupt, ...) is one ConfigError."""
    import datasets

    from train.errors import ConfigError

    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types
        raise ConfigError(f"data.source={source!r}: cannot load it as a local path or a Hugging "
                          f"Face dataset ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                          ) from None
    if "train" not in loaded:
        raise ConfigError(f"data.source={source!r} has no 'train' split; splits: "
                          f"{', '.join(loaded)}")
    return loaded
