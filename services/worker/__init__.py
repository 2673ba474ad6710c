"""Ray Serve deployment hosting the engine, with the adapter cache tiers (coming)."""
