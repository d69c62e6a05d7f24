"""Past runs: listing (local and remote), the query API, and catching runs up (sync)."""
