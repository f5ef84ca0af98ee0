"""A local black-box inference server for bbt-client: stdlib HTTP, torch model, no web framework."""
