"""Python that MONAI lacks for this bundle; importable as `scripts` when run from the bundle folder."""


def as_bool(value: object) -> bool:
    """A config flag as a bool: command-line overrides such as `--amp false` arrive as strings."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}.")
    return bool(value)
