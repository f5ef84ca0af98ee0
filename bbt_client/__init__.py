"""bbt-client: tune a continuous prompt for a language model you can only query."""

__version__ = "0.1.0"
