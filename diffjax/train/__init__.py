"""Training: optimizer, pure steps, metrics and the run loop."""
