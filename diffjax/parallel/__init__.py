"""Device meshes, distributed start-up, and the logical-axis sharding rules."""
