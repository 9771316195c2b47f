"""Classic merges, same inputs and outputs as `merge`."""
