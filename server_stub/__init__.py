"""A local black-box inference server for bbt-client: asyncio and h11 HTTP, a torch model, no web framework.

- :mod:`server_stub.http`: what clients talk to -- framing, protocol v1's routes, the OpenAI/vLLM face's.
- :mod:`server_stub.engine`: the compute behind them -- loading, row layout, prompted scoring, the model thread.
- :mod:`server_stub.app` wires both from one options object; ``python -m server_stub`` is its command line;
  :mod:`server_stub.testing` and :mod:`server_stub.gate` start and hold servers for tests.
"""
