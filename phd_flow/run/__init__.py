"""One run: the Node and its Args, the active run, its lifecycle, and the run directory's layout."""
