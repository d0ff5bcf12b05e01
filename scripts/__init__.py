"""Developer tools of the repository (not shipped in the wheel): the demo and the tiny base."""
