"""flora-gateway services: the engine (torch only) and the edges around it."""
