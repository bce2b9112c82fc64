"""cmcr."""
