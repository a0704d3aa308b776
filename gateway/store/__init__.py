"""The durable boundary: records are committed here before anyone publishes them."""
