"""Torch pieces shared by the local GDFO student and the server (answer-slot layer, weight digests)."""
