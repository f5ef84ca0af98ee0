"""Tuning methods as ask–tell tuners: BBT, BBTv2, GDFO."""
