"""Optimisers and projections: CMA-ES, compass search, random subspaces. Pure numpy."""
