"""The server's HTTP side: framing (:mod:`.framing`) and the two faces on one port -- protocol v1
(:mod:`.routes_v1`) and the OpenAI/vLLM face (:mod:`.routes_openai`). Handlers parse and check requests on the
event loop and hand every model call to :class:`server_stub.engine.worker.ModelWorker`; they never run torch."""
