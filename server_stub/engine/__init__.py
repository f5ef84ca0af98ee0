"""The server's compute: load a checkpoint (:mod:`.loading`), lay out rows (:mod:`.layout`), score them with
prompts (:mod:`.model`, :mod:`.shared_batches`) or read next-token distributions (:mod:`.next_token`), on one
model thread (:mod:`.worker`). Nothing here knows HTTP or JSON; bad input raises
:class:`server_stub.errors.InvalidInput`."""
