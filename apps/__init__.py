"""The sample shop: frontend, catalog, reviews and ratings, with their manifests."""
