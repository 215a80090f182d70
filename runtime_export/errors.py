"""The error every bad input raises."""


class DatasetError(ValueError):
    """Bad input data: the message names the file, the field and the problem (never the file's contents)."""
